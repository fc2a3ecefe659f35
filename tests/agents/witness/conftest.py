"""WITNESS test fixtures: the model trained on the shipped dev set, and exemplars seeded
with it, as a fresh install's store is."""

from __future__ import annotations

import pytest

from trinity.agents.witness.dataset import load_devset
from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.exemplars import InMemoryExemplars
from trinity.agents.witness.model import TrainedModel
from trinity.agents.witness.text import event_text
from trinity.agents.witness.train import train


@pytest.fixture(scope="module")
def model(embedder: Embedder) -> TrainedModel:
    """Trained once per module on the full dev set (~3 s)."""
    return train([(event, label) for event, label, _ in load_devset()], embedder)


def seeded(embedder: Embedder) -> InMemoryExemplars:
    """In-memory exemplars holding the dev set."""
    data = load_devset()
    exemplars = InMemoryExemplars(embedder.dim)
    vectors = embedder.embed([event_text(event).text for event, _, _ in data])
    exemplars.add(vectors, [label for _, label, _ in data], "seed")
    return exemplars
