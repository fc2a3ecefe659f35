"""Model-call test fixtures: the fault servers (tests/agents/models/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agents.models.servers import FaultServer, RefusingPort


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
