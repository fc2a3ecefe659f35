"""Fixtures for the bus tests: short run dirs, settings, a journal, helper processes.

Unix socket paths must stay under ~100 bytes, so the run directory (where the
``ipc://`` sockets live) is a short ``/tmp`` directory, not pytest's tmp_path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from tests.bus._common import make_settings
from trinity.bus.journal import Journal
from trinity.settings import Settings

HERE = Path(__file__).resolve().parent
PUBLISHER_SCRIPT = HERE / "_publisher.py"
CONSUMER_SCRIPT = HERE / "_consumer.py"


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


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.02) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Procs:
    """Helper processes started by a test; whatever is still running at teardown is killed."""

    def __init__(self, data_dir: Path, run_dir: Path) -> None:
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def _start(self, script: Path, *args: str) -> subprocess.Popen[bytes]:
        # stderr goes to a file: a pipe nobody reads could fill up and stall the helper.
        log = self.data_dir / f"{script.stem}.{len(self.started)}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), str(self.data_dir), str(self.run_dir), *args],
                stdout=subprocess.DEVNULL, stderr=err,
            )
        self.started.append(proc)
        self.logs[proc.pid] = log
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")[-3000:]

    def publisher(self, *args: str) -> subprocess.Popen[bytes]:
        return self._start(PUBLISHER_SCRIPT, *args)

    def consumer(self, *args: str) -> subprocess.Popen[bytes]:
        return self._start(CONSUMER_SCRIPT, *args)

    def finish(self, proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{what} did not finish within {timeout_s} s:\n{self.stderr(proc)}")
        assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{self.stderr(proc)}"

    @staticmethod
    def kill9(proc: subprocess.Popen[bytes]) -> bool:
        """SIGKILL ``proc``; True if it was still running (so the kill really hit it)."""
        alive = proc.poll() is None
        proc.kill()
        proc.wait()
        return alive and proc.returncode == -9

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def procs(bus_data_dir: Path, bus_run_dir: Path) -> Iterator[Procs]:
    p = Procs(bus_data_dir, bus_run_dir)
    yield p
    p.cleanup()
