"""Agent-test fixtures: one embedding table per test session."""

from __future__ import annotations

import pytest

from trinity.agents.witness import embedding
from trinity.agents.witness.embedding import Embedder, default_table_path, load_embedder


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The installed tables (make install builds them), or ones built here (~18 s) if absent."""
    path = default_table_path()
    if not path.exists():
        path = tmp_path_factory.mktemp("cache") / embedding.TABLE_NAME
    return load_embedder(path)
