"""Agent-test fixtures: one embedding table per test session."""

from __future__ import annotations

import pytest

from trinity.agents import embedding
from trinity.agents.embedding import StaticEmbedder, default_table_path, load_embedder


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> StaticEmbedder:
    """The installed table (make install builds it), or one built here (~18 s) if absent."""
    path = default_table_path()
    if not path.exists():
        path = tmp_path_factory.mktemp("cache") / embedding.TABLE_NAME
    return load_embedder(path)
