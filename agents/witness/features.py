"""Hashed n-gram features of a normalised text, computed without scikit-learn or SciPy.

Three blocks of ``2**18`` hashed columns each (word 1-2-grams, character 2-5-grams
within words, WordPiece 1-2-grams), as ``HashedRows``; ``SparseWeights`` keeps the
classifier's weights for them (nonzero rows only) and ``HashedRows.dot`` applies them.
``_design`` stacks the weighted sentence embedding and these blocks into the training
design matrix (training only: it imports SciPy). See ``model`` for the method.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
# sklearn on arbitrary text.
_WORD_TOKENS = re.compile(r"(?u)\b\w+\b|[^\w\s]")  # word 1-2-grams of words and symbols
_PIECE_TOKENS = re.compile(r"\S+")  # word 1-2-grams of WordPiece tokens
_WHITE_SPACES = re.compile(r"\s\s+")  # sklearn's char_wb whitespace folding
_CHAR_NGRAMS = (2, 5)


def _word_grams(tokens: list[str]) -> list[str]:
    """sklearn's word n-grams for ngram_range (1, 2): the tokens, then adjacent pairs."""
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


def _char_wb_grams(text: str) -> list[str]:
    """sklearn's ``char_wb`` 2-5-grams: inside words padded with one space each side; a
    padded word shorter than n counts once, whole."""
    lo, hi = _CHAR_NGRAMS
    grams: list[str] = []
    for word in _WHITE_SPACES.sub(" ", text).split():
        w = f" {word} "
        for n in range(lo, hi + 1):
            if len(w) <= n:
                grams.append(w)
                break
            grams.extend(w[i : i + n] for i in range(len(w) - n + 1))
    return grams


def _hash_block(grams: list[str]) -> np.ndarray:
    """The sorted distinct columns of ``grams`` (values are implied: binary, then l2)."""
    hashes = np.fromiter(map(mmh3.hash, grams), dtype=np.int64, count=len(grams))
    columns: np.ndarray = np.unique(np.abs(hashes) % _N_HASH)
    return columns


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


def _hashed_rows(blocks: Sequence[Sequence[list[str]]]) -> HashedRows:
    """``blocks[b][r]``: the n-grams of row ``r`` in block ``b``."""
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    indptr = [0]
    for r in range(len(blocks[0])):
        nnz = 0
        for b, block in enumerate(blocks):
            columns = _hash_block(block[r])
            if len(columns):
                indices.append(columns + b * _N_HASH)
                # sklearn: l2 norm in float64 over ones, then the float32 design matrix
                data.append(np.full(len(columns), 1.0 / math.sqrt(len(columns)), np.float32))
                nnz += len(columns)
        indptr.append(indptr[-1] + nnz)
    return HashedRows(
        np.asarray(indptr, dtype=np.int64),
        np.concatenate(indices) if indices else np.zeros(0, np.int64),
        np.concatenate(data) if data else np.zeros(0, np.float32),
    )


_TOKENIZER: Any = None


def _wordpieces(normalised: Sequence[str]) -> list[str]:
    """The normalised texts as WordPiece tokens (typos and inflections share pieces)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from trinity.agents.witness.embedding import _load_tokenizer

        _TOKENIZER = _load_tokenizer()
    encs = _TOKENIZER.encode_batch(list(normalised), add_special_tokens=False)
    return [" ".join(e.tokens[:256]) for e in encs]


def _sparse_features(normalised: Sequence[str]) -> HashedRows:
    pieces = _wordpieces(normalised)
    return _hashed_rows(
        (
            [_word_grams(_WORD_TOKENS.findall(t)) for t in normalised],
            [_char_wb_grams(t) for t in normalised],
            [_word_grams(_PIECE_TOKENS.findall(t)) for t in pieces],
        )
    )


def _design(vectors: np.ndarray, sparse: HashedRows) -> sp.csr_matrix:
    import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]

    dense = sp.csr_matrix(vectors.astype(np.float32) * EMBED_WEIGHT)
    return sp.hstack([dense, sparse.to_csr()], format="csr", dtype=np.float32)
