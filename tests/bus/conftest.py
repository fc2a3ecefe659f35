"""Fixtures for the bus tests: short run dirs, settings, a journal (the helper processes
of the multi-process bus tests are tests/system's ``procs``).

Unix socket paths must stay under ~100 bytes, so the run directory (where the
``ipc://`` sockets live) is a short ``/tmp`` directory, not pytest's tmp_path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.bus._common import make_settings
from trinity.bus.journal import Journal
from trinity.settings import Settings


@pytest.fixture
def bus_run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tb", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bus_data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def bus_settings(bus_data_dir: Path, bus_run_dir: Path) -> Settings:
    return make_settings(bus_data_dir, bus_run_dir)


@pytest.fixture
def journal(bus_settings: Settings) -> Iterator[Journal]:
    j = Journal(bus_settings.messages_db, source="test")
    yield j
    j.close()


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
