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

# The pattern store's index: HNSW graph search over the stored vectors. An exact search
# reads every vector (at 10k exemplars ~1 ms a query, growing with the store as learning
# adds exemplars); the graph visits a few hundred: ~0.1 ms a query at 10k and 20k, with
# 99 % of the exact top 10 and the exact nearest one for every dev-set event (measured
# on the joint 512-d vectors). M=16 links per vector (~130 bytes) and efSearch=64 were
# the cheapest settings with that recall; efConstruction=80 builds 10k in ~1.5 s.
HNSW_M = 16
HNSW_EF_SEARCH = 64
HNSW_EF_CONSTRUCTION = 80
# The stored vectors are float16 (the pattern store keeps them so), so an index holding
# float16 holds exactly the same values as a float32 one at half the bytes. Decoding
# float16 is fast only in faiss's SIMD builds (the one loaded follows the CPU); elsewhere
# float32 vectors are the faster.
_SIMD_BUILD = bool({"AVX2", "AVX512", "NEON", "SVE"} & set(faiss.get_compile_options().split()))


def vector_index(dim: int) -> faiss.Index:
    """An inner-product HNSW index over ``dim``-d float16-valued vectors, of the kind
    fastest for the faiss build loaded on this machine."""
    index: faiss.Index
    if _SIMD_BUILD:
        # the stubs name the quantiser's type where faiss takes its code (an int)
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16,  # type: ignore[arg-type]
                                  HNSW_M, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return tune_index(index)


def tune_index(index: faiss.Index) -> faiss.Index:
    """Set the search depth (also on an index read from a file)."""
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    return index


@dataclass(frozen=True)
class Neighbour:
    exemplar_id: int
    similarity: float
    label: str
    session_id: str


class NeighbourSearch(Protocol):
    def search(self, vector: np.ndarray, k: int) -> list[Neighbour]: ...

    def search_many(self, vectors: np.ndarray, k: int) -> list[list[Neighbour]]: ...


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
        return self.search_many(np.asarray(vector).reshape(1, -1), k)[0]

    def search_many(self, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        queries = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if not self._labels or k <= 0:
            return [[] for _ in range(len(queries))]
        sims, ids = self._index.search(queries, min(k, len(self._labels)))
        return [[Neighbour(int(i), float(s), self._labels[int(i)], self._sessions[int(i)])
                 for s, i in zip(srow, irow, strict=True) if i >= 0]
                for srow, irow in zip(sims, ids, strict=True)]


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
