"""Fitting WITNESS's model: base classifier, combiner, temperature and thresholds.

``train`` fits everything ``TrainedModel`` holds from labelled events, choosing the
calibration and the per-pattern thresholds on out-of-fold predictions (folds grouped by
repository, or by near-duplicate clusters); see ``model`` for the method. scikit-learn
and SciPy are imported inside the functions that fit, so importing this module (as
``knowledge`` does) loads neither and classifying never needs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.exemplars import (
    K_NEIGHBOURS,
    VOTE_TEMPERATURE,
    InMemoryExemplars,
    Neighbour,
    _neighbour_features,
)
from trinity.agents.witness.features import (
    EMBED_WEIGHT,
    SparseWeights,
    _design,
    _sparse_features,
)
from trinity.agents.witness.model import (
    _LABEL_INDEX,
    _NONE_INDEX,
    Combiner,
    TrainedModel,
    _flag_scores,
    _log_softmax,
)
from trinity.agents.witness.text import event_text, normalise
from trinity.contract import LABELS, PATTERNS

if TYPE_CHECKING:
    import scipy.sparse as sp  # type: ignore[import-untyped,unused-ignore]

# Candidates for the vote softness, chosen per training run on second-level out-of-fold
# log-loss (0.05 and 0.2 were tried as candidates: no better on held-out repositories).
_VOTE_TEMPERATURES = (VOTE_TEMPERATURE,)
# Budget for "a none event was given a pattern", used when choosing the threshold.
NONE_FP_BUDGET = 0.04
_MIN_THRESHOLD = 0.5
_MAX_THRESHOLD = 0.95


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
