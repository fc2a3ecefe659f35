"""Hashed n-gram features of a normalised text, computed without scikit-learn or SciPy.

Three blocks of ``2**18`` hashed columns each (word 1-2-grams, character 2-5-grams
within words, WordPiece 1-2-grams), as ``HashedRows``; ``SparseWeights`` keeps the
classifier's weights for them (nonzero rows only) and ``HashedRows.dot`` applies them.
``_sparse_features`` computes them for a batch of texts, one or many: what depends on
one word alone comes from bounded per-word caches, and one sort orders the whole
batch's columns, with exactly the result of hashing every n-gram of every text.
``_design`` stacks the weighted sentence embedding and these blocks into the training
design matrix (training only: it imports SciPy). See ``model`` for the method.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import mmh3
import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]

_N_HASH = 2**18
# Relative weight of the dense embedding block against the two unit-norm hashed blocks.
EMBED_WEIGHT = 1.5

# The three hashed blocks are scikit-learn's HashingVectorizer(n_features=2**18,
# binary=True, norm="l2", alternate_sign=False, lowercase=False) with the analyzers below,
# reproduced here so that classifying imports neither scikit-learn nor SciPy (~85 MB of
# a WITNESS process's own memory): n-grams as sklearn builds them, MurmurHash3 (x86, 32-bit, seed 0,
# signed) of their UTF-8 bytes, column ``abs(hash) % 2**18``, each distinct column 1,
# the row scaled to unit length. tests/agents/witness/test_detector.py checks equality with
# sklearn on arbitrary text, and test_features_speed.py the cached path against the plain
# one (every n-gram hashed, each text tokenised whole) bit for bit.
_WORD_TOKENS = re.compile(r"(?u)\b\w+\b|[^\w\s]")  # word 1-2-grams of words and symbols
_PIECE_TOKENS = re.compile(r"\S+")  # word 1-2-grams of WordPiece tokens
_CHAR_NGRAMS = (2, 5)


def _word_grams(tokens: list[str]) -> list[str]:
    """sklearn's word n-grams for ngram_range (1, 2): the tokens, then adjacent pairs."""
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


def _padded_word_grams(word: str) -> list[str]:
    """sklearn's ``char_wb`` 2-5-grams of one word: padded with one space each side; a
    padded word shorter than n counts once, whole (and longer n are not tried)."""
    w = f" {word} "
    slices = _SLICES.get(len(w))
    if slices is None:
        slices = _gram_slices(len(w))
        if len(w) <= 66:
            _SLICES[len(w)] = slices  # ~8k slices in all, ~0.5 MB at most
    return list(map(w.__getitem__, slices))


def _gram_slices(size: int) -> tuple[slice, ...]:
    """Where the grams of a padded word of ``size`` characters are: its n-grams for each
    n from 2 to 5 below ``size``, then the whole word if it is shorter than 6."""
    lo, hi = _CHAR_NGRAMS
    out = [slice(i, i + n) for n in range(lo, min(hi + 1, size)) for i in range(size - n + 1)]
    if size <= hi:
        out.append(slice(0, size))
    return tuple(out)


_SLICES: dict[int, tuple[slice, ...]] = {}


def _columns(grams: list[str]) -> np.ndarray:
    """The column of each of ``grams``, in order (int64, repeats kept)."""
    hashes = np.fromiter(map(mmh3.hash, grams), dtype=np.int64, count=len(grams))
    out: np.ndarray = np.abs(hashes) % _N_HASH
    return out


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)``, sorting ``values`` in place (numpy 2's np.unique hashes
    them, which here is ~7 times slower than a sort on 300 integers, ~20 on 10**5)."""
    values.sort()
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    out: np.ndarray = values[keep]
    return out


def _grouped_columns(groups: list[list[str]]) -> list[bytes]:
    """The sorted distinct columns of each group of grams, as native int32 bytes (cache
    entries): hashed all at once, sorted in one array of keys group * 2**18 + column."""
    grams = [gram for group in groups for gram in group]
    cells = np.arange(len(groups) + 1, dtype=np.int64) * _N_HASH
    keys = _columns(grams)
    keys += np.repeat(cells[:-1], np.array([len(group) for group in groups], np.int64))
    keys = _sorted_distinct(keys)
    bounds = keys.searchsorted(cells).tolist()
    columns = (keys % _N_HASH).astype(np.int32)
    return [columns[a:b].tobytes() for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class SparseWeights:
    """The hashed block of the classifier's weights, (3 * 2**18, k), keeping only rows
    with a nonzero weight: a feature never seen in training has an all-zero row (L2
    gives it no weight), and ~94 % of the hashed columns are such, so the dense matrix
    (19 MB) would be mostly zeros in WITNESS's memory and in the cached model."""

    index: np.ndarray  # (n_rows,) int64, sorted: which rows are stored
    rows: np.ndarray  # (n_rows + 1, k) float32; the last row is all zeros

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> SparseWeights:
        index = np.flatnonzero(np.any(dense != 0, axis=1))
        zero = np.zeros((1, dense.shape[1]), dtype=np.float32)
        rows = np.concatenate([dense[index].astype(np.float32), zero])
        return cls(index.astype(np.int64), np.ascontiguousarray(rows))

    def to_dense(self, n_columns: int) -> np.ndarray:
        dense = np.zeros((n_columns, self.n_labels), dtype=np.float32)
        dense[self.index] = self.rows[:-1]
        return dense

    @property
    def n_labels(self) -> int:
        return int(self.rows.shape[1])

    def rows_of(self, columns: np.ndarray) -> np.ndarray:
        """The weight rows of hashed ``columns`` (zeros for a column never trained on)."""
        at = np.searchsorted(self.index, columns)
        found = at < len(self.index)
        found[found] = self.index[at[found]] == columns[found]
        out: np.ndarray = self.rows[np.where(found, at, len(self.index))]
        return out


@dataclass(frozen=True)
class HashedRows:
    """The hashed n-gram features of some texts, as CSR arrays over the three blocks
    (words, chars, pieces side by side: ``3 * 2**18`` columns); float32 values."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64, sorted within each row
    data: np.ndarray  # (nnz,) float32

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def to_csr(self) -> sp.csr_matrix:
        """As a SciPy matrix, for training (imports SciPy)."""
        import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]

        return sp.csr_matrix(
            (self.data, self.indices, self.indptr),
            shape=(self.n_rows, 3 * _N_HASH),
            dtype=np.float32,
        )

    def dot(self, weights: SparseWeights) -> np.ndarray:
        """``rows @ weights`` for (3 * 2**18, k) float32 weights: each row's terms added
        in column order, in float32, as SciPy's CSR product does."""
        out = np.zeros((self.n_rows, weights.n_labels), dtype=np.float32)
        terms = self.data[:, None] * weights.rows_of(self.indices)
        for r in range(self.n_rows):
            start, stop = int(self.indptr[r]), int(self.indptr[r + 1])
            if stop > start:
                # a running sum is strictly sequential (a reduction may pair terms up)
                out[r] = np.cumsum(terms[start:stop], axis=0, dtype=np.float32)[-1]
        return out


# -- per-word caches -----------------------------------------------------------------
# A text's columns are the union of parts that each depend on one word alone, so those
# parts are cached and a text costs a dictionary look-up a word, the hashes of the pairs
# that straddle two words, and one sort. Rows are binary (distinct columns), so a union
# is exact. Per whitespace-separated word (``str.split()``, as sklearn's char_wb splits;
# it folds whitespace runs with re's \s first, which knows the same whitespace as
# str.split(), Py_UNICODE_ISSPACE): its char_wb columns (sklearn pads and n-grams each
# word alone), and the columns of its word tokens and their pairs within it, with its
# first and last token for the pairs across words (``_WORD_TOKENS`` never matches
# across whitespace and every other character is in a token, so the text's tokens are
# its words' tokens end to end). Per space-separated segment: its WordPieces likewise
# (see ``_BY_SEGMENT``).
#
# Each cache is a dict that empties itself on reaching _CACHE_CAP entries (the working
# vocabulary is then re-learnt: a new word costs ~20 µs in a batch, ~50 µs alone, most
# of it the tokenizer's), and words or segments longer than _CACHED_CHARS are computed
# each time, never stored, so an entry's size is bounded (~1% of distinct words are).
# Measured with tracemalloc (keys, values, the dict's share) on the labelled events: an
# entry takes ~0.45 kB in the words cache and ~0.25 kB in the segments cache, so the
# two hold ~11 MB when full; at most (32 characters, each its own token and piece, 4
# bytes each) ~1.15 kB and ~0.5 kB, ~27 MB.
_CACHE_CAP = 2**14
_CACHED_CHARS = 32
# Columns are kept as native int32 bytes, sorted and distinct (~4 bytes a column).
# word -> (char columns, columns of its tokens and their pairs, first token, last token)
_Word = tuple[bytes, bytes, str, str]
_WORDS: dict[str, _Word] = {}
# segment -> (columns of its pieces and their pairs, how many pieces, first, last piece)
_Segment = tuple[bytes, int, str, str]
_SEGMENTS: dict[str, _Segment] = {}
_NO_PIECES: _Segment = (b"", 0, "", "")
# Sentinels, compared by identity: their values equal no entry's nor each other's (equal
# constant tuples may be one object).
_UNKNOWN_WORD: _Word = (b"", b"", "?", "?")
_UNKNOWN_SEGMENT: _Segment = (b"", -1, "", "")
_E = TypeVar("_E", _Word, _Segment, bytes)


def _remember(cache: dict[str, Any], key: str, value: Any,
              max_chars: int = _CACHED_CHARS) -> None:
    if len(key) <= max_chars:
        if len(cache) >= _CACHE_CAP:
            cache.clear()
        cache[key] = value


def _entries(
    cache: dict[str, _E],
    unknown: _E,
    split: list[list[str]],
    new_entries: Callable[[list[str]], list[_E]],
    max_chars: int = _CACHED_CHARS,
) -> dict[str, _E]:
    """The entry of every key in ``split``: from ``cache``, or ``new_entries`` of those
    not in it (computed together, then cached if at most ``max_chars`` long)."""
    get = cache.get
    table = {key: get(key, unknown) for keys in split for key in keys}
    new = [key for key, entry in table.items() if entry is unknown]
    if new:
        for key, entry in zip(new, new_entries(new), strict=True):
            table[key] = entry
            _remember(cache, key, entry, max_chars)
    return table


def _word_entries(words: list[str]) -> list[_Word]:
    tokens = [_WORD_TOKENS.findall(word) for word in words]  # never empty: see above
    columns = _grouped_columns(
        [_padded_word_grams(word) for word in words] + [_word_grams(t) for t in tokens]
    )
    n = len(words)
    return [
        (columns[i], columns[n + i], sys.intern(t[0]), sys.intern(t[-1]))
        for i, t in enumerate(tokens)
    ]


def _segment_entries(pieces: list[list[str]]) -> list[_Segment]:
    columns = _grouped_columns([_word_grams(p) for p in pieces])
    return [
        (c, len(p), sys.intern(p[0]), sys.intern(p[-1])) if p else _NO_PIECES
        for c, p in zip(columns, pieces, strict=True)
    ]


_TOKENIZER: Any = None
# Whether a text's WordPieces are its space-separated segments' pieces end to end: a BERT
# normaliser works character by character (NFD reorders only combining marks, which
# never cross a space; lower-casing looks no further than a space either) and the
# pre-tokeniser splits at spaces, so a segment is tokenised alike alone. Only " "
# separates segments: other whitespace may be a control character the normaliser drops.
# Also, no token may be empty or hold whitespace, so that ``_PIECE_TOKENS`` gives the
# tokens back from ``_wordpieces``'s joined string. Otherwise texts are tokenised whole.
_BY_SEGMENT = False
_MAX_PIECES = 256  # a text's first 256 pieces count


def _tokenizer() -> Any:
    global _TOKENIZER, _BY_SEGMENT
    if _TOKENIZER is None:
        from tokenizers import normalizers, pre_tokenizers

        from trinity.agents.witness.embedding import _load_tokenizer

        tokenizer = _load_tokenizer()
        vocab = list(tokenizer.get_vocab(with_added_tokens=True))
        _BY_SEGMENT = (
            isinstance(tokenizer.normalizer, normalizers.BertNormalizer)
            and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
            and all(vocab)
            and len("".join(vocab).split()) == 1
        )
        _TOKENIZER = tokenizer
    return _TOKENIZER


def _wordpieces(normalised: Sequence[str]) -> list[str]:
    """The normalised texts as WordPiece tokens (typos and inflections share pieces)."""
    encs = _tokenizer().encode_batch(list(normalised), add_special_tokens=False)
    return [" ".join(e.tokens[:_MAX_PIECES]) for e in encs]


def _pieces_of(segments: list[str]) -> list[_Segment]:
    encs = _tokenizer().encode_batch(segments, add_special_tokens=False)
    return _segment_entries([e.tokens for e in encs])


def _segments(texts: list[str]) -> tuple[list[list[str]], dict[str, _Segment]]:
    """Each text's segments, and the entry of each of them (one tokenizer call for
    those not cached)."""
    _tokenizer()
    if not _BY_SEGMENT:  # a text is one segment, its pieces as _wordpieces has them
        pieces = [_PIECE_TOKENS.findall(p) for p in _wordpieces(texts)]
        return [[t] for t in texts], dict(zip(texts, _segment_entries(pieces), strict=True))
    split = [t.split(" ") for t in texts]
    return split, _entries(_SEGMENTS, _UNKNOWN_SEGMENT, split, _pieces_of)


def _sparse_features(normalised: Sequence[str]) -> HashedRows:
    texts = list(normalised)
    n_rows = len(texts)
    split, segment_entries = _segments(texts)
    words_of = [text.split() for text in texts]
    word_entries = _entries(_WORDS, _UNKNOWN_WORD, words_of, _word_entries)
    # Every column goes into one array of keys (3 * row + block) * 2**18 + column, so
    # that one sort orders them by row, block and column. Runs of keys: the hashes of
    # ``grams`` (pairs across words or segments: each row's words', then its pieces'),
    # then the cached columns of the words block, chars block and pieces block, each
    # row after row.
    grams: list[str] = []
    gram_sizes: list[int] = []
    runs: tuple[list[bytes], list[bytes], list[bytes]] = ([], [], [])
    for text, text_words, segments in zip(texts, words_of, split, strict=True):
        # words and chars
        words: list[bytes] = []
        chars: list[bytes] = []
        last: str | None = None
        start = len(grams)
        for word in text_words:
            char_columns, word_columns, first, end = word_entries[word]
            chars.append(char_columns)
            words.append(word_columns)
            if last is not None:
                grams.append(f"{last} {first}")
            last = end
        gram_sizes.append(len(grams) - start)
        runs[0].append(b"".join(words))
        runs[1].append(b"".join(chars))
        # pieces
        pieces: list[bytes] = []
        count = 0
        last = None
        start = len(grams)
        for segment in segments:
            piece_columns, n_pieces, first, end = segment_entries[segment]
            if n_pieces:
                pieces.append(piece_columns)
                if last is not None:
                    grams.append(f"{last} {first}")
                last = end
                count += n_pieces
        if count > _MAX_PIECES:  # rare: only the first 256 count; tokenise the text whole
            del grams[start:], pieces[:]
            grams += _word_grams(_PIECE_TOKENS.findall(_wordpieces([text])[0]))
        gram_sizes.append(len(grams) - start)
        runs[2].append(b"".join(pieces))
    gram_cells = [(3 * r + b) * _N_HASH for r in range(n_rows) for b in (0, 2)]
    run_cells = [(3 * r + b) * _N_HASH for b in range(3) for r in range(n_rows)]
    all_runs = runs[0] + runs[1] + runs[2]
    sizes = gram_sizes + [len(run) // 4 for run in all_runs]
    keys = np.concatenate([_columns(grams), np.frombuffer(b"".join(all_runs), np.int32)])
    keys += np.repeat(np.array(gram_cells + run_cells, np.int64), np.array(sizes, np.int64))
    return _hashed_rows(_sorted_distinct(keys), n_rows)


_CELL_STARTS = np.arange(3 * 256 + 1, dtype=np.int64) * _N_HASH


def _hashed_rows(keys: np.ndarray, n_rows: int) -> HashedRows:
    """The rows of sorted distinct keys ``(3 * row + block) * 2**18 + column``."""
    # where each (row, block) cell starts, and where the last row ends
    cells = _CELL_STARTS[: 3 * n_rows + 1]
    if len(cells) <= 3 * n_rows:
        cells = np.arange(3 * n_rows + 1, dtype=np.int64) * _N_HASH
    starts = keys.searchsorted(cells)
    counts = starts[1:] - starts[:-1]
    # sklearn: l2 norm in float64 over ones, then the float32 design matrix
    scale = (1.0 / np.sqrt(np.maximum(counts, 1))).astype(np.float32)
    return HashedRows(
        starts[::3].astype(np.int64),
        keys % (3 * _N_HASH) if n_rows > 1 else keys,  # block * 2**18 + column
        np.repeat(scale, counts),
    )


def _design(vectors: np.ndarray, sparse: HashedRows) -> sp.csr_matrix:
    import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]

    dense = sp.csr_matrix(vectors.astype(np.float32) * EMBED_WEIGHT)
    return sp.hstack([dense, sparse.to_csr()], format="csr", dtype=np.float32)
