"""Nearest labelled exemplars and the evidence the detector takes from them.

``Neighbour`` is one exemplar found for a text, ``NeighbourSearch`` what the detector
asks for them (the pattern store implements it), ``InMemoryExemplars`` an exact
in-memory stand-in (training folds, evaluation, tests), and ``_neighbour_features`` turns
the neighbours of a text into the combiner's inputs: per label the similarity-weighted
vote share and best similarity, then the overall top similarity (see ``model``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from trinity.contract import LABELS

_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}

K_NEIGHBOURS = 10
# Softness of the neighbour vote: a neighbour 0.1 less similar weighs e^-1 as much.
VOTE_TEMPERATURE = 0.1

# single thread: per-call latency matters more than throughput, and WITNESS shares the host
faiss.omp_set_num_threads(1)

# The stored vectors are float16 (the pattern store keeps them so), so an index holding
# float16 holds exactly the same values as a float32 one at half the bytes a search reads:
# ~2.5x faster at 10k exemplars, where a search is bound by memory bandwidth. Decoding
# float16 is fast only in faiss's SIMD builds (the one loaded follows the CPU); elsewhere
# the plain float32 index is the faster.
_SIMD_BUILD = bool({"AVX2", "AVX512", "NEON", "SVE"} & set(faiss.get_compile_options().split()))


def vector_index(dim: int) -> faiss.Index:
    """An exact inner-product index over ``dim``-d float16-valued vectors, the fastest kind
    for the faiss build loaded on this machine."""
    if _SIMD_BUILD:
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(dim)


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
