"""WITNESS's pattern detector: learned classifier + nearest exemplars, calibrated, abstaining.

Each event becomes one text (``event_text``): the message plus the structured fields that
exist in the wild (severity, error type, file/line, test name, failure rate, files, labels,
source, stack trace), rendered as short natural-language lines so both feature families
below can use them. Fields that merely restate a label (``user_intent``, ``pattern``, ...)
are ignored: the message must carry the evidence, or the detector would learn the trivia
of one producer instead of the patterns.

Scoring has two stages.

1. **Base classifier** - a multinomial logistic regression over
   (a) the static sentence embedding of the text (MiniLM and WordLlama token tables side
   by side, see ``embedding``; semantics: "intermittently fails" ~ "flaky"), and
   (b) hashed word 1-2-grams and character 2-5-grams of a *normalised* text in which
   numbers, hex ids, timestamps, URLs, paths and quoted identifiers are masked and
   snake/camel identifiers split, so the model learns the shape of a mypy error or a Go
   panic rather than the file names of the dev set.
   Inference uses the fitted weight matrices directly with numpy and hashes n-grams
   itself: only training imports scikit-learn and SciPy.

2. **Combiner** - the base log-probabilities plus neighbour evidence from the exemplar
   store: per label, the similarity-weighted vote share of the top-k exemplars
   (weights ``exp((sim - top) / 0.1)``) and the best similarity to an exemplar of that
   label, plus the overall top similarity (how familiar the text is at all). Logits are
   ``a*log p_l + b*vote_l + c*best_l + bias_l`` (+ ``u*top`` for none): weights shared
   across labels, ten numbers in all, fitted by log-loss on *out-of-fold* base
   predictions and out-of-fold neighbour evidence (exemplars = the other folds, as the
   store would be seeded). It thus learns how far neighbour evidence can be trusted on
   unseen repositories; exemplars added by learning raise confidence for a recurring
   pattern as much as such evidence proved reliable, not by a hand-set bonus. (A full
   19x6 stacking matrix was tried and did no better out of fold; shared weights cannot
   learn per-label quirks of the dev set.)

Training augmentation: every event that carries structured fields is also fitted as a
message-only copy (weight 0.25), so the base classifier cannot lean on *which* fields a
producer fills in. The normalised text gets line-start markers (``xxbos``), so "Added
dark mode" opening a merged PR title is a different feature from "add dark mode" inside a
request, and a third hashed block of WordPiece 1-2-grams (the embedding's tokenizer) lets
typos and inflections share evidence.

Calibration: the combiner is itself a log-loss fit on out-of-fold scores (vector scaling);
on top, its logits are divided by a temperature fitted on the combiner's *own* out-of-fold
predictions (second-level folds), which also give honest probabilities for choosing the
threshold. Abstention compares the most probable *pattern* against ``none`` only:
the detector returns that pattern when ``p(pattern) / (p(pattern) + p(none))`` reaches the
pattern's threshold (always > 0.5, so a pattern never wins against a more probable
``none``), otherwise it abstains. A pattern split with another pattern is not abstained
on merely because its own probability is low; it is abstained on when ``none`` is
competitive. Per-pattern thresholds start at 0.5 and are raised greedily on the
out-of-fold probabilities (cheapest pattern first: fewest correct detections lost per
``none`` false positive removed) until the out-of-fold false-pattern rate on ``none``
events is within 4 % - so "hello world" is an abstention, not a guess.

Folds inside ``train`` are grouped (by repository when groups are given, otherwise by
clusters of near-duplicate texts) so that near-copies never make neighbour evidence look
more reliable than it is.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import mmh3
import numpy as np

from trinity.agents.embedding import Embedder
from trinity.errors import InvalidPayload

if TYPE_CHECKING:
    import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]

PATTERNS = (
    "critical_error",
    "constitution_violation",
    "feature_request",
    "duplication",
    "flaky_test",
)
NONE = "none"
LABELS = PATTERNS + (NONE,)
_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}
_NONE_INDEX = _LABEL_INDEX[NONE]

DATA_DIR = Path(__file__).parent / "data"
MAX_MESSAGE_CHARS = 4000
MAX_FIELD_CHARS = 300
MAX_STACK_CHARS = 1000
MAX_LIST_ITEMS = 20
# Hashed features only look at the head of long texts: the decisive part of a log or a
# trace is near its start, and this bounds the per-call cost.
MAX_FEATURE_CHARS = 1500

K_NEIGHBOURS = 10
# Softness of the neighbour vote: a neighbour 0.1 less similar weighs e^-1 as much.
VOTE_TEMPERATURE = 0.1
# Candidates for the vote softness, chosen per training run on second-level out-of-fold
# log-loss (0.05 and 0.2 were tried as candidates: no better on held-out repositories).
_VOTE_TEMPERATURES = (VOTE_TEMPERATURE,)
# Budget for "a none event was given a pattern", used when choosing the threshold.
NONE_FP_BUDGET = 0.04
_MIN_THRESHOLD = 0.5
_MAX_THRESHOLD = 0.95

# single thread: per-call latency matters more than throughput, and WITNESS shares the host
faiss.omp_set_num_threads(1)


# -- event text ---------------------------------------------------------------


@dataclass(frozen=True)
class EventText:
    text: str
    notes: tuple[str, ...]


def _clean(text: str) -> tuple[str, bool]:
    """Valid UTF-8 without control characters; says whether anything was replaced."""
    fixed = text.encode("utf-8", "replace").decode("utf-8")
    changed = fixed != text
    out = "".join(
        ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" or ch == "\r" else " "
        for ch in fixed
    )
    return out.replace("\r\n", "\n").replace("\r", "\n"), changed or out != fixed


def _type_name(value: object) -> str:
    return type(value).__name__


def _field_str(event: Mapping[str, Any], key: str, notes: list[str]) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        notes.append(f"field {key!r} ignored: expected str, got {_type_name(value)}")
        return None
    cleaned, _ = _clean(value[:MAX_FIELD_CHARS])
    cleaned = " ".join(cleaned.split())
    return cleaned or None


def _field_int(event: Mapping[str, Any], key: str, notes: list[str]) -> int | None:
    value = event.get(key)
    if value is None:
        return None
    # bool is an int subclass, but "line": true is not a line number
    if isinstance(value, bool) or not isinstance(value, int):
        notes.append(f"field {key!r} ignored: expected int, got {_type_name(value)}")
        return None
    return value


def _field_str_list(event: Mapping[str, Any], key: str, notes: list[str]) -> list[str] | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        notes.append(f"field {key!r} ignored: expected list of str, got {_type_name(value)}")
        return None
    items = [" ".join(_clean(v[:MAX_FIELD_CHARS])[0].split()) for v in value[:MAX_LIST_ITEMS]]
    items = [v for v in items if v]
    if len(value) > MAX_LIST_ITEMS:
        notes.append(f"field {key!r} truncated to {MAX_LIST_ITEMS} items")
    return items or None


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def _field_rate(event: Mapping[str, Any], notes: list[str]) -> float | None:
    """A failure rate as a fraction; accepts 0.4, 40 (percent) and "40%"."""
    value = event.get("failure_rate")
    if value is None:
        return None
    rate: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str):
        m = _RATE.match(value[:50])
        if m:
            rate = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if rate is not None and rate > 1.0:
        rate /= 100.0
    if rate is None or not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
        notes.append(
            f"field 'failure_rate' ignored: expected a rate in [0, 1] or a percentage, "
            f"got {_type_name(value)}"
        )
        return None
    return rate


def _render_fields(event: Mapping[str, Any], notes: list[str]) -> list[str]:
    lines: list[str] = []
    severity = _field_str(event, "severity", notes)
    if severity:
        lines.append(f"severity: {severity.lower()}")
    error_type = _field_str(event, "error_type", notes)
    if error_type:
        lines.append(f"error type: {error_type}")
    file = _field_str(event, "file", notes)
    line = _field_int(event, "line", notes)
    if file:
        lines.append(f"file: {file}" + (f" line {line}" if line is not None else ""))
    test_name = _field_str(event, "test_name", notes)
    test_file = _field_str(event, "test_file", notes)
    if test_name or test_file:
        where = f" in {test_file}" if test_file else ""
        lines.append(f"test: {test_name or ''}{where}".replace("test:  in", "test in"))
    rate = _field_rate(event, notes)
    if rate is not None:
        lines.append(f"failure rate: {round(rate * 100)}%")
    files = _field_str_list(event, "files", notes)
    if files:
        lines.append(f"files ({len(files)}): " + ", ".join(files))
    labels = _field_str_list(event, "labels", notes)
    if labels:
        lines.append("labels: " + ", ".join(labels))
    source = _field_str(event, "source", notes)
    if source:
        lines.append(f"source: {source}")
    trace = event.get("stack_trace")
    if trace is not None:
        if isinstance(trace, str):
            cleaned = _clean(trace[:MAX_STACK_CHARS])[0].strip()
            if cleaned:
                lines.append(f"stack trace: {cleaned}")
        else:
            notes.append(f"field 'stack_trace' ignored: expected str, got {_type_name(trace)}")
    return lines


def event_text(event: Mapping[str, Any]) -> EventText:
    """The text an event is classified by, with notes on what was ignored or cut.

    Raises ``InvalidPayload`` when there is nothing to classify (no usable message) and
    never anything else: this sits on the bus boundary, where any other exception would be
    a crash loop on one poisoned message.
    """
    try:
        return _event_text(event)
    except InvalidPayload:
        raise
    except Exception as exc:  # noqa: BLE001 - boundary: every failure becomes a rejection
        raise InvalidPayload(f"unreadable event: {_type_name(exc)}") from None


def _event_text(event: Mapping[str, Any]) -> EventText:
    if not isinstance(event, Mapping):
        raise InvalidPayload(f"event must be a JSON object, got {_type_name(event)}")
    if "message" not in event:
        raise InvalidPayload("missing field 'message'")
    message = event["message"]
    if not isinstance(message, str):
        raise InvalidPayload(f"field 'message' must be str, got {_type_name(message)}")
    notes: list[str] = []
    if len(message) > MAX_MESSAGE_CHARS:
        notes.append(f"message truncated from {len(message)} to {MAX_MESSAGE_CHARS} chars")
        message = message[:MAX_MESSAGE_CHARS]
    message, replaced = _clean(message)
    if replaced:
        notes.append("invalid unicode or control characters replaced in message")
    message = message.strip()
    if not message:
        raise InvalidPayload("field 'message' is empty")
    lines = [message, *_render_fields(event, notes)]
    return EventText("\n".join(lines), tuple(notes))


# -- normalisation for hashed features ----------------------------------------

_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"https?://\S+|www\.\S+"), " url "),
    (
        re.compile(
            r"\d{4}[-/]\d{2}[-/]\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?)?"
            r"(?:Z|\s?[+-]\d{2}:?\d{2}|\s?UTC)?"
        ),
        " timestamp ",
    ),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), " timestamp "),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), " hex "),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b"), " hex "),
)
_QUOTED = re.compile(r"'[^'\n]{1,80}'|\"[^\"\n]{1,80}\"|`[^`\n]{1,80}`")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\w.@~+-]*[/\\])+[\w.@+-]*")
_FILENAME = re.compile(r"\b[\w-]+\.(?:[a-z]{1,4})\b(?=[\s:(,)]|$)")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WS = re.compile(r"\s+")


def _mask_keep_test(tag: str) -> Any:
    """A mask that keeps one bit of the masked text: whether it names a test."""

    def repl(m: re.Match[str]) -> str:
        return f" {tag} test " if "test" in m.group(0).lower() else f" {tag} "

    return repl


def normalise(text: str) -> str:
    """Lower-cased text with trivia masked and identifiers split (for hashed features)."""
    text = text[:MAX_FEATURE_CHARS]
    # line-start markers: "Added ..." opening a line (a done change) is not "add ..."
    # inside a sentence, and a log's line heads carry its format
    text = "xxbos " + text.replace("\n", " xxbos ")
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    text = _QUOTED.sub(_mask_keep_test("quoted"), text)
    text = _PATH.sub(_mask_keep_test("path"), text)
    text = _FILENAME.sub(_mask_keep_test("filename"), text)
    text = _CAMEL.sub(" ", text)
    text = text.replace("_", " ")
    text = _NUMBER.sub("0", text)
    return _WS.sub(" ", text).strip().lower()


# -- neighbours -----------------------------------------------------------------


@dataclass(frozen=True)
class Neighbour:
    exemplar_id: int
    similarity: float
    label: str
    session_id: str


class NeighbourSearch(Protocol):
    def search(self, vector: np.ndarray, k: int) -> list[Neighbour]: ...


class InMemoryExemplars:
    """Exact inner-product search over unit vectors; the store's stand-in for tests/eval."""

    def __init__(self, dim: int) -> None:
        self._index = faiss.IndexFlatIP(dim)
        self._labels: list[str] = []
        self._sessions: list[str] = []

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, vectors: np.ndarray, labels: Sequence[str], session_id: str) -> list[int]:
        vecs = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(labels), -1))
        first = len(self._labels)
        if len(labels):
            self._index.add(vecs)
        self._labels.extend(labels)
        self._sessions.extend([session_id] * len(labels))
        return list(range(first, first + len(labels)))

    def search(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        if not self._labels or k <= 0:
            return []
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        sims, ids = self._index.search(query, min(k, len(self._labels)))
        return [
            Neighbour(int(i), float(s), self._labels[int(i)], self._sessions[int(i)])
            for s, i in zip(sims[0], ids[0], strict=True)
            if i >= 0
        ]


# -- features ---------------------------------------------------------------------

_N_HASH = 2**18
# Relative weight of the dense embedding block against the two unit-norm hashed blocks.
EMBED_WEIGHT = 1.5

# The three hashed blocks are scikit-learn's HashingVectorizer(n_features=2**18,
# binary=True, norm="l2", alternate_sign=False, lowercase=False) with the analyzers below,
# reproduced here so that classifying imports neither scikit-learn nor SciPy (~85 MB of
# a WITNESS process's own memory): n-grams as sklearn builds them, MurmurHash3 (x86, 32-bit, seed 0,
# signed) of their UTF-8 bytes, column ``abs(hash) % 2**18``, each distinct column 1,
# the row scaled to unit length. tests/agents/test_detector.py checks equality with
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
        from trinity.agents.embedding import _load_tokenizer

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


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def _neighbour_features(
    neighbours: Sequence[Neighbour], vote_temperature: float = VOTE_TEMPERATURE
) -> np.ndarray:
    """Per label: vote share, best similarity; then the overall best similarity."""
    n = len(LABELS)
    votes = np.zeros(n, dtype=np.float64)
    best = np.zeros(n, dtype=np.float64)
    top = 0.0
    usable = [nb for nb in neighbours if nb.label in _LABEL_INDEX and math.isfinite(nb.similarity)]
    if usable:
        top = max(nb.similarity for nb in usable)
        for nb in usable:
            i = _LABEL_INDEX[nb.label]
            votes[i] += math.exp((nb.similarity - top) / vote_temperature)
            best[i] = max(best[i], nb.similarity)
        votes /= votes.sum()
    return np.concatenate([votes, np.clip(best, 0.0, 1.0), [max(top, 0.0)]])


@dataclass(frozen=True)
class Combiner:
    """Base log-probabilities + neighbour evidence -> logits, with weights shared by labels.

    ``z_l = a*log p_l + b*vote_l + c*best_l + bias_l (+ u*top for none)``. Sharing the
    weights across labels keeps this to ten numbers, so out-of-fold data from ~850 events
    pins them down: it learns *how much* neighbour evidence is worth, not per-label quirks.
    ``u`` lets an event unlike anything known lean towards ``none``.
    """

    params: np.ndarray  # [a, b, c, u, bias_0..bias_5]

    def logits(self, logp: np.ndarray, knn: np.ndarray) -> np.ndarray:
        n = len(LABELS)
        a, b, c, u = self.params[:4]
        z = a * np.maximum(logp, -30.0) + b * knn[..., :n] + c * knn[..., n : 2 * n]
        z = z + self.params[4:]
        z[..., _NONE_INDEX] += u * knn[..., 2 * n]
        out: np.ndarray = z
        return out


_COMBINER_L2 = 1e-3


def _fit_combiner(logp: np.ndarray, knn: np.ndarray, y: np.ndarray) -> Combiner:
    n = len(LABELS)
    logp = np.maximum(logp, -30.0)
    vote, best, top = knn[:, :n], knn[:, n : 2 * n], knn[:, 2 * n]
    onehot = np.eye(n)[y]

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = Combiner(params).logits(logp, knn)
        lp = _log_softmax(z)
        nll = float(-(lp * onehot).sum() / len(y)) + _COMBINER_L2 * float(params @ params)
        g = (np.exp(lp) - onehot) / len(y)
        grad = np.concatenate(
            [
                [
                    (g * logp).sum(),
                    (g * vote).sum(),
                    (g * best).sum(),
                    (g[:, _NONE_INDEX] * top).sum(),
                ],
                g.sum(axis=0),
            ]
        )
        return nll, grad + 2 * _COMBINER_L2 * params

    from scipy.optimize import minimize  # type: ignore[import-untyped,unused-ignore]

    x0 = np.zeros(4 + n)
    x0[0] = 1.0
    res = minimize(objective, x0, jac=True, method="L-BFGS-B")
    return Combiner(np.asarray(res.x, dtype=np.float64))


# -- the model --------------------------------------------------------------------


@dataclass
class TrainedModel:
    """Everything ``Detector`` needs; plain numpy arrays so it pickles small and loads fast."""

    sparse_weights: SparseWeights  # (n_hashed, n_labels), zero rows left out
    dense_weights: np.ndarray  # (dim, n_labels) float32, already scaled by EMBED_WEIGHT
    bias: np.ndarray  # (n_labels,)
    combiner: Combiner
    temperature: float
    threshold: float
    embedder_fingerprint: str
    k: int = K_NEIGHBOURS
    labels: tuple[str, ...] = LABELS
    info: dict[str, Any] = field(default_factory=dict)
    # per-pattern thresholds (same order as PATTERNS); None -> ``threshold`` for all
    class_thresholds: tuple[float, ...] | None = None
    vote_temperature: float = VOTE_TEMPERATURE

    def base_logits(self, vectors: np.ndarray, sparse: HashedRows) -> np.ndarray:
        dense = vectors.astype(np.float32) @ self.dense_weights
        hashed = sparse.dot(self.sparse_weights)
        out: np.ndarray = dense + hashed + self.bias
        return out

    def combined_logits(self, logp: np.ndarray, knn: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.combiner.logits(logp, knn) / self.temperature
        return out


def load_devset() -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every shipped dev-set line; the event has no label fields."""
    return load_labelled("devset_*.jsonl")


def load_labelled(pattern: str) -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every line of the data files matching ``pattern``."""
    out: list[tuple[dict[str, Any], str, str]] = []
    for path in sorted(DATA_DIR.glob(pattern)):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                label = row.pop("label")
                origin = row.pop("origin")
                row.pop("kind", None)
                out.append((row, label, origin))
    return out


@dataclass(frozen=True)
class _Base:
    """A fitted base classifier with weights over the full (uncompressed) feature space."""

    coef: np.ndarray  # (n_labels, n_features)
    intercept: np.ndarray  # (n_labels,)

    def log_proba(self, x: sp.csr_matrix) -> np.ndarray:
        return _log_softmax(np.asarray(x @ self.coef.T) + self.intercept)


def _fit_base(
    x: sp.csr_matrix, y: np.ndarray, c: float, weight: np.ndarray | None = None
) -> _Base:
    """Multinomial logistic regression fitted on the columns that occur at all.

    Hashing spreads ~30k live n-grams over half a million columns; lbfgs pays for every
    column on every iteration, so fitting on the live ones is ~15x faster and identical
    (an all-zero column gets a zero weight under L2 anyway).
    """
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped,unused-ignore]

    used = np.unique(x.indices)
    clf = LogisticRegression(C=c, max_iter=500, tol=1e-4)
    clf.fit(x[:, used], y, sample_weight=weight)
    n_labels = len(LABELS)
    coef = np.zeros((n_labels, x.shape[1]), dtype=np.float32)
    intercept = np.full(n_labels, -30.0)
    coef[np.ix_(clf.classes_, used)] = clf.coef_
    intercept[clf.classes_] = clf.intercept_
    return _Base(coef, intercept)


def _near_duplicate_groups(vectors: np.ndarray, threshold: float = 0.92) -> np.ndarray:
    """Union-find clusters of texts at least ``threshold`` similar (fallback CV groups)."""
    n = vectors.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sims = vectors @ vectors.T
    rows, cols = np.nonzero(np.triu(sims >= threshold, k=1))
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
    return np.array([find(i) for i in range(n)])


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    def nll(log_t: float) -> float:
        logp = _log_softmax(logits / math.exp(log_t))
        return float(-logp[np.arange(len(y)), y].mean())

    from scipy.optimize import minimize_scalar  # type: ignore[import-untyped,unused-ignore]

    res = minimize_scalar(nll, bounds=(math.log(0.2), math.log(5.0)), method="bounded")
    return float(math.exp(res.x))




def _flag_scores(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best pattern index, its score against the threshold)."""
    pat = probs[..., : len(PATTERNS)]
    best = pat.argmax(axis=-1)
    p_best = np.take_along_axis(pat, best[..., None], axis=-1)[..., 0]
    score = p_best / np.maximum(p_best + probs[..., _NONE_INDEX], 1e-12)
    return best, score


def choose_threshold(probs: np.ndarray, y: np.ndarray) -> float:
    """Smallest threshold keeping the none false-pattern rate within budget.

    With calibrated probabilities the argmax is already the accuracy-optimal decision, so
    any threshold only trades accuracy for fewer false patterns; take the least of it. The
    floor of 0.5 makes every returned pattern more likely right than wrong.
    """
    _, score = _flag_scores(probs)
    is_none = y == _NONE_INDEX
    hi = _MAX_THRESHOLD
    for t in np.arange(_MIN_THRESHOLD, hi + 1e-9, 0.01):
        flagged = score >= max(t, 0.5 + 1e-9)
        fp = float(flagged[is_none].mean()) if is_none.any() else 0.0
        if fp <= NONE_FP_BUDGET:
            return float(round(t, 2))
    return hi




def choose_class_thresholds(
    probs: np.ndarray, y: np.ndarray, threshold: float
) -> tuple[float, ...]:
    """Per-pattern thresholds: start every pattern at the shared ``threshold`` (which keeps
    the none budget) and lower, greedily, the pattern whose lower bar gains the most correct
    out-of-fold detections while the false-pattern rate on ``none`` stays within budget.

    A bar is never above the shared one, so a pattern that separates cleanly from ``none``
    gets a lower bar and no pattern gets a stricter one than before.
    """
    best, score = _flag_scores(probs)
    is_none = y == _NONE_INDEX
    n_none = max(int(is_none.sum()), 1)
    right = best == y
    t = np.full(len(PATTERNS), threshold)
    grid = np.round(np.arange(_MIN_THRESHOLD, threshold - 1e-9, 0.01), 2)

    def outcome(bars: np.ndarray) -> tuple[float, int]:
        flagged = (score >= bars[best]) & (score > 0.5)
        return float((flagged & is_none).sum()) / n_none, int((flagged & right).sum())

    while True:
        _, base_right = outcome(t)
        choice: tuple[int, int, float] | None = None
        for c in range(len(PATTERNS)):
            for cand in grid:
                if cand >= t[c]:
                    break
                bars = t.copy()
                bars[c] = cand
                fp, n_right = outcome(bars)
                if fp <= NONE_FP_BUDGET and n_right > base_right:
                    if choice is None or n_right - base_right > choice[0]:
                        choice = (n_right - base_right, c, float(cand))
                    break  # lowest acceptable bar for this pattern found
        if choice is None:
            break
        t[choice[1]] = choice[2]
    return tuple(float(v) for v in t)


# C and EMBED_WEIGHT were picked by repository-grouped CV with seeds 1-3 (the reported
# evaluation uses seed 0); within a wide range (C 3-30, weight 0.75-2) nothing moved
# accuracy by more than noise, so they are not fitted per training run.
BASE_C = 10.0
# Weight of the message-only copies (1 = as much as the original event).
AUGMENT_WEIGHT = 0.25


def train(
    examples: Sequence[tuple[Mapping[str, Any], str]],
    embedder: Embedder,
    *,
    groups: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> TrainedModel:
    """Fit base classifier, combiner, temperature and threshold (~3 s for 850 examples).

    ``groups`` (e.g. the repository of each example) keeps related items in one inner
    fold; without it near-duplicate texts are grouped.
    """
    for _, label in examples:
        if label not in _LABEL_INDEX:
            raise ValueError(f"unknown label {label!r}")
    # Training only: classifying needs neither (see HashedRows).
    import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]
    from sklearn.model_selection import StratifiedGroupKFold  # type: ignore[import-untyped,unused-ignore]

    texts = [event_text(event).text for event, _ in examples]
    y = np.array([_LABEL_INDEX[label] for _, label in examples])
    vectors = embedder.embed(texts)
    sparse = _sparse_features([normalise(t) for t in texts])
    x = _design(vectors, sparse)
    group_ids = (
        np.unique(np.asarray(groups), return_inverse=True)[1]
        if groups is not None
        else _near_duplicate_groups(vectors)
    )

    # Augmentation: a message-only copy of every event that carries structured fields, so
    # the base classifier cannot lean on which fields a producer happens to fill in.
    aug_src = [
        i
        for i, (event, _) in enumerate(examples)
        if texts[i] != event_text({"message": event["message"]}).text
    ]
    if aug_src:
        aug_texts = [event_text({"message": examples[i][0]["message"]}).text for i in aug_src]
        aug_x = _design(
            embedder.embed(aug_texts), _sparse_features([normalise(t) for t in aug_texts])
        )
        x_all = sp.vstack([x, aug_x], format="csr")
    else:
        x_all = x
    src = np.concatenate([np.arange(len(y)), np.asarray(aug_src, dtype=int)])
    y_all = y[src]
    w_all = np.concatenate([np.ones(len(y)), np.full(len(aug_src), AUGMENT_WEIGHT)])

    def rows(idx: np.ndarray) -> np.ndarray:
        return np.nonzero(np.isin(src, idx))[0]

    n_labels = len(LABELS)
    oof_logp = np.zeros((len(y), n_labels))
    oof_nbrs: list[list[Neighbour]] = [[] for _ in range(len(y))]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, va in splitter.split(x, y, group_ids):
        r = rows(tr)
        oof_logp[va] = _fit_base(x_all[r], y_all[r], BASE_C, w_all[r]).log_proba(x[va])
        exemplars = InMemoryExemplars(embedder.dim)
        exemplars.add(vectors[tr], [LABELS[i] for i in y[tr]], "train")
        for i in va:
            oof_nbrs[i] = exemplars.search(vectors[i], K_NEIGHBOURS)
    # Out-of-fold combiner logits, to choose the vote temperature and fit the temperature
    # and the threshold honestly (training data only: second-level folds).
    chosen: tuple[float, float, np.ndarray, np.ndarray, float] | None = None
    for vote_t in _VOTE_TEMPERATURES:
        knn_t = np.array([_neighbour_features(nb, vote_t) for nb in oof_nbrs])
        logits_t = np.zeros((len(y), n_labels))
        for tr, va in splitter.split(knn_t, y, group_ids):
            logits_t[va] = _fit_combiner(oof_logp[tr], knn_t[tr], y[tr]).logits(
                oof_logp[va], knn_t[va]
            )
        temp_t = _fit_temperature(logits_t, y)
        nll = float(-_log_softmax(logits_t / temp_t)[np.arange(len(y)), y].mean())
        if chosen is None or nll < chosen[0] - 1e-4:
            chosen = (nll, vote_t, knn_t, logits_t, temp_t)
    assert chosen is not None
    _, vote_temperature, oof_knn, oof_logits, temperature = chosen
    oof_probs = np.exp(_log_softmax(oof_logits / temperature))
    threshold = choose_threshold(oof_probs, y)
    class_thresholds = choose_class_thresholds(oof_probs, y, threshold)

    combiner = _fit_combiner(oof_logp, oof_knn, y)
    base = _fit_base(x_all, y_all, BASE_C, w_all)
    dim = vectors.shape[1]
    coef = base.coef
    return TrainedModel(
        sparse_weights=SparseWeights.from_dense(coef[:, dim:].T),
        dense_weights=np.ascontiguousarray(coef[:, :dim].T * EMBED_WEIGHT),
        bias=base.intercept,
        combiner=combiner,
        temperature=temperature,
        threshold=threshold,
        class_thresholds=class_thresholds,
        vote_temperature=vote_temperature,
        embedder_fingerprint=embedder.fingerprint,
        info={
            "examples": len(y),
            "oof_accuracy": float((oof_probs.argmax(1) == y).mean()),
            "combiner": [round(float(v), 3) for v in combiner.params],
            "oof_base_accuracy": float((oof_logp.argmax(1) == y).mean()),
        },
    )


# -- detection --------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One decision. ``pattern`` is None on abstention (best label none, or too unsure).

    ``label`` is the most probable label (even when abstaining, for explanations);
    ``confidence`` is the calibrated probability that the decision is right: of
    ``pattern`` when one is returned, of ``none`` when abstaining.
    """

    pattern: str | None
    label: str
    confidence: float
    probabilities: Mapping[str, float]
    neighbours: tuple[Neighbour, ...]
    vector: np.ndarray
    notes: tuple[str, ...]
    text: str = ""  # what was classified (``event_text``), kept for the store


class Detector:
    def __init__(
        self, embedder: Embedder, model: TrainedModel, exemplars: NeighbourSearch
    ) -> None:
        if model.embedder_fingerprint != embedder.fingerprint:
            # A model trained on another table would read its vectors as noise.
            raise ValueError("model was trained with a different embedding table")
        self.embedder = embedder
        self.model = model
        self.exemplars = exemplars

    def probabilities(
        self, text: str, vector: np.ndarray, neighbours: Sequence[Neighbour]
    ) -> np.ndarray:
        sparse = _sparse_features([normalise(text)])
        base_logp = _log_softmax(self.model.base_logits(vector.reshape(1, -1), sparse))[0]
        knn = _neighbour_features(neighbours, self.model.vote_temperature)
        probs: np.ndarray = np.exp(_log_softmax(self.model.combined_logits(base_logp, knn)))
        return probs

    def classify(self, event: Mapping[str, Any]) -> Detection:
        et = event_text(event)
        vector = self.embedder.embed([et.text])[0]
        neighbours = tuple(self.exemplars.search(vector, self.model.k))
        probs = self.probabilities(et.text, vector, neighbours)
        label = LABELS[int(probs.argmax())]
        best_pattern, score = _flag_scores(probs)
        bar = (
            self.model.class_thresholds[int(best_pattern)]
            if self.model.class_thresholds is not None
            else self.model.threshold
        )
        if float(score) >= bar and float(score) > 0.5:
            pattern: str | None = PATTERNS[int(best_pattern)]
            confidence = float(probs[int(best_pattern)])
        else:
            pattern = None
            confidence = float(probs[_NONE_INDEX])
        return Detection(
            pattern=pattern,
            label=label,
            confidence=confidence,
            probabilities={lab: float(p) for lab, p in zip(LABELS, probs, strict=True)},
            neighbours=neighbours,
            vector=vector,
            notes=et.notes,
            text=et.text,
        )
