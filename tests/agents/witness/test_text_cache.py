"""The detector's text cache: a recurring text skips its text-only work and is decided
exactly as a detector without the cache decides it, against the store as it is now."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from tests.agents.witness.conftest import seeded
from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.exemplars import InMemoryExemplars
from trinity.agents.witness.model import Detection, Detector, TrainedModel
from trinity.agents.witness.text import event_text

CRASH = {"message": "worker 3 died: segmentation fault (core dumped) in libvips resize"}
TEXTS = ["the nightly job timed out talking to the billing gateway (502)",
         "please add a --since option to the export command",
         "test_sync_clock fails about one run in five on the arm runners"]


class CountingEmbedder:
    """The real embedder, counting the texts it was asked to embed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.embedded: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded.extend(texts)
        return self.inner.embed(texts)


def same(a: Detection, b: Detection) -> None:
    assert (a.pattern, a.label, a.key, a.text) == (b.pattern, b.label, b.key, b.text)
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    assert a.neighbours == b.neighbours
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)


def test_a_recurring_text_is_not_embedded_again_and_is_decided_the_same(
        embedder: Embedder, model: TrainedModel) -> None:
    counting = CountingEmbedder(embedder)
    exemplars = seeded(embedder)
    cached = Detector(counting, model, exemplars)  # type: ignore[arg-type]
    plain = Detector(embedder, model, exemplars, text_cache=0)
    first = cached.classify(CRASH)
    again = cached.classify_many([CRASH, {"message": TEXTS[0]}, CRASH])
    assert counting.embedded == [event_text(CRASH).text, TEXTS[0]]
    assert (cached.text_hits, cached.text_misses) == (2, 2)
    for det in (first, again[0], again[2]):
        same(det, plain.classify(CRASH))
    same(again[1], plain.classify({"message": TEXTS[0]}))


def test_the_store_is_asked_every_time(embedder: Embedder, model: TrainedModel) -> None:
    """What the store learned since a text was cached changes its next decision."""
    exemplars = seeded(embedder)
    cached = Detector(embedder, model, exemplars)
    before = cached.classify(CRASH)
    exemplars.add(before.vector.reshape(1, -1), ["flaky_test"], "live")
    after = cached.classify(CRASH)
    assert cached.text_hits == 1
    assert after.probabilities["flaky_test"] > before.probabilities["flaky_test"]
    same(after, Detector(embedder, model, exemplars, text_cache=0).classify(CRASH))


def test_the_cache_is_bounded_and_drops_the_least_recently_seen(
        embedder: Embedder, model: TrainedModel) -> None:
    counting = CountingEmbedder(embedder)
    cached = Detector(counting, model, seeded(embedder), text_cache=2)  # type: ignore[arg-type]
    for text in (TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[2]):  # TEXTS[1] is the oldest now
        cached.classify({"message": text})
    counting.embedded.clear()
    cached.classify({"message": TEXTS[0]})
    cached.classify({"message": TEXTS[2]})
    assert counting.embedded == []
    cached.classify({"message": TEXTS[1]})
    assert counting.embedded == [TEXTS[1]]
    assert len(cached._prepared) == 2


def test_without_the_cache_every_text_is_worked_out(
        embedder: Embedder, model: TrainedModel) -> None:
    counting = CountingEmbedder(embedder)
    plain = Detector(counting, model, seeded(embedder), text_cache=0)  # type: ignore[arg-type]
    plain.classify(CRASH)
    plain.classify(CRASH)
    assert counting.embedded == [event_text(CRASH).text] * 2
    assert len(plain._prepared) == 0


class CountingSearch:
    """The real exemplars, counting the vectors searched for."""

    def __init__(self, inner: InMemoryExemplars) -> None:
        self.inner = inner
        self.searched = 0

    def search(self, vector: np.ndarray, k: int) -> list:  # type: ignore[type-arg]
        return self.search_many(vector.reshape(1, -1), k)[0]

    def search_many(self, vectors: np.ndarray, k: int) -> list:  # type: ignore[type-arg]
        self.searched += len(vectors)
        return self.inner.search_many(vectors, k)


def test_events_of_one_text_in_a_batch_are_decided_once(
        embedder: Embedder, model: TrainedModel) -> None:
    exemplars = seeded(embedder)
    counting = CountingSearch(exemplars)
    detector = Detector(embedder, model, counting)  # type: ignore[arg-type]
    batch = [CRASH, {"message": TEXTS[1]}, dict(CRASH, event_id="again"), CRASH]
    decided = detector.classify_many(batch)
    assert counting.searched == 2
    alone = Detector(embedder, model, exemplars, text_cache=0)
    for event, det in zip(batch, decided, strict=True):
        same(det, alone.classify(event))
    # each event gets its own decision object: one changed does not change the others
    decided[0].probabilities["none"] = -1.0  # type: ignore[index]
    assert decided[2].probabilities["none"] >= 0.0
