"""Agent-test fixtures: one embedding table per test session; the fault servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agents.servers import FaultServer, RefusingPort
from trinity.agents.witness import embedding
from trinity.agents.witness.embedding import Embedder, default_table_path, load_embedder


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The installed tables (make install builds them), or ones built here (~18 s) if absent."""
    path = default_table_path()
    if not path.exists():
        path = tmp_path_factory.mktemp("cache") / embedding.TABLE_NAME
    return load_embedder(path)


@pytest.fixture(scope="module")
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture
def faults(fault_server: FaultServer) -> FaultServer:
    fault_server.reset()
    return fault_server


@pytest.fixture
def refused() -> Iterator[str]:
    """The base URL of a port that refuses connections."""
    port = RefusingPort()
    yield port.url
    port.close()

