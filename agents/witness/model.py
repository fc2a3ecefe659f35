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

Where the parts live: ``text`` (the event's text and its normalised form), ``features``
(hashed n-grams), ``exemplars`` (neighbours and their evidence), this module (combiner,
trained model, inference: ``Detector``), ``train`` (fitting all of it) and ``dataset``
(the shipped labelled events).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.exemplars import (
    K_NEIGHBOURS,
    VOTE_TEMPERATURE,
    Neighbour,
    NeighbourSearch,
    _neighbour_features,
)
from trinity.agents.witness.features import HashedRows, SparseWeights, _sparse_features
from trinity.agents.witness.text import event_text, key_of, normalise
from trinity.contract import LABELS, NONE, PATTERNS

_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}
_NONE_INDEX = _LABEL_INDEX[NONE]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


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


def _flag_scores(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best pattern index, its score against the threshold)."""
    pat = probs[..., : len(PATTERNS)]
    best = pat.argmax(axis=-1)
    p_best = np.take_along_axis(pat, best[..., None], axis=-1)[..., 0]
    score = p_best / np.maximum(p_best + probs[..., _NONE_INDEX], 1e-12)
    return best, score


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
    key: str = ""  # ``text.key_of`` its normalised form: the same event has the same key


# Event texts whose text-only work (normalised form, embedding, base log-probabilities)
# a detector keeps, least recently seen dropped first. Recurring events are the common case
# (a crash loop logs one line, a gate prints one finding, the plan's scenario reuses its
# variants); a text's neighbours are still searched every time, the store changes. An
# entry is ~2.5 kB (the vector is most of it), so ~2.5 MB when full.
TEXT_CACHE = 1024


class _Prepared(NamedTuple):
    """What a text decides before the exemplars are asked: a pure function of the text and
    the model, so it is kept per text (``Detector.text_cache``)."""

    normalised: str
    key: str
    vector: np.ndarray  # (dim,) the embedding
    base_logp: np.ndarray  # (labels,) the base classifier's log-probabilities


class Detector:
    def __init__(
        self, embedder: Embedder, model: TrainedModel, exemplars: NeighbourSearch, *,
        text_cache: int = TEXT_CACHE,
    ) -> None:
        if model.embedder_fingerprint != embedder.fingerprint:
            # A model trained on another table would read its vectors as noise.
            raise ValueError("model was trained with a different embedding table")
        self.embedder = embedder
        self.model = model
        self.exemplars = exemplars
        self.text_cache = text_cache  # 0: every text is worked out afresh
        self._prepared: OrderedDict[str, _Prepared] = OrderedDict()
        self.text_hits = self.text_misses = 0

    def _base_logp(self, normalised: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        return _log_softmax(self.model.base_logits(vectors, _sparse_features(normalised)))

    def _probabilities(self, base_logp: np.ndarray,
                       neighbours: Sequence[Sequence[Neighbour]]) -> np.ndarray:
        knn = np.stack([_neighbour_features(nb, self.model.vote_temperature)
                        for nb in neighbours])
        probs: np.ndarray = np.exp(_log_softmax(self.model.combined_logits(base_logp, knn)))
        return probs

    def _prepare(self, texts: Sequence[str]) -> list[_Prepared]:
        """Each text's text-only work: from the cache, or for the texts it lacks (each
        once) with one normalising pass, one embedding call and one matrix product."""
        cache = self._prepared
        missing = list(dict.fromkeys(text for text in texts if text not in cache))
        fresh: dict[str, _Prepared] = {}
        if missing:
            normalised = [normalise(text) for text in missing]
            vectors = self.embedder.embed(missing)
            logp = self._base_logp(normalised, vectors)
            fresh = {text: _Prepared(normalised[i], key_of(normalised[i]), vectors[i].copy(),
                                     logp[i].copy())
                     for i, text in enumerate(missing)}
        out = []
        for text in texts:
            hit = cache.get(text)
            if hit is None:
                out.append(fresh[text])
            else:
                cache.move_to_end(text)
                out.append(hit)
        self.text_hits += len(texts) - len(missing)
        self.text_misses += len(missing)
        if self.text_cache > 0:
            cache.update(fresh)
            while len(cache) > self.text_cache:
                cache.popitem(last=False)
        return out

    def classify(self, event: Mapping[str, Any]) -> Detection:
        return self.classify_many([event])[0]

    def classify_many(self, events: Sequence[Mapping[str, Any]]) -> list[Detection]:
        """Each event's decision; one embedding call, one index search, one n-gram pass and
        one matrix product for them all, so a batch costs less per event than one. A text
        seen lately skips its text-only work (``TEXT_CACHE``), and events of one text in
        a batch are decided once: the store does not change within a batch."""
        if not events:
            return []
        ets = [event_text(event) for event in events]
        texts = list(dict.fromkeys(et.text for et in ets))
        prepared = self._prepare(texts)
        self.text_hits += len(ets) - len(texts)
        vectors = np.stack([p.vector for p in prepared])
        neighbours = self.exemplars.search_many(vectors, self.model.k)
        probs = self._probabilities(np.stack([p.base_logp for p in prepared]), neighbours)
        best_patterns, scores = _flag_scores(probs)
        bars = (np.asarray(self.model.class_thresholds)[best_patterns]
                if self.model.class_thresholds is not None
                else np.full(len(texts), self.model.threshold))
        decided: dict[str, tuple[str | None, str, float, dict[str, float],
                                 tuple[Neighbour, ...], _Prepared]] = {}
        for i, text in enumerate(texts):
            best, score, row = int(best_patterns[i]), float(scores[i]), probs[i]
            if score >= float(bars[i]) and score > 0.5:
                pattern: str | None = PATTERNS[best]
                confidence = float(row[best])
            else:
                pattern = None
                confidence = float(row[_NONE_INDEX])
            decided[text] = (pattern, LABELS[int(row.argmax())], confidence,
                             {lab: float(p) for lab, p in zip(LABELS, row, strict=True)},
                             tuple(neighbours[i]), prepared[i])
        out = []
        for et in ets:
            pattern, label, confidence, probabilities, near, prep = decided[et.text]
            out.append(Detection(
                pattern=pattern, label=label, confidence=confidence,
                probabilities=dict(probabilities), neighbours=near, vector=prep.vector,
                notes=et.notes, text=et.text, key=prep.key,
            ))
        return out
