"""Fixtures shared by every test folder: short temporary project folders, a project
with the repo's supervisor.conf (and its supervisord stopped afterwards), a Firestore
emulator.

Unix socket paths are limited to ~107 bytes, so project folders live directly
under /tmp rather than under pytest's (long) tmp_path. In CI (``CI=true``) a
missing resource fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.firestore_emulator import FirestoreEmulator, need_emulator
from trinity.controller.supervision.supervisord import Supervisor, cleanup_orphans

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def modules_imported(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of the top-level modules ``names`` a fresh interpreter holds after running
    ``code`` (the imports of a long-lived process: what each of them costs in memory)."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert found.returncode == 0, found.stderr
    loaded: list[str] = json.loads(found.stdout)
    return loaded


def emit_every_event(controller: Any, journal: Any, run: Any, timeout_s: float = 10) -> None:
    """Tick an in-process Controller until it has emitted every event of ``run``."""
    from trinity.stores import runs

    def emitted_all() -> bool:
        controller.tick()
        return bool(runs.progress(journal.conn, run.run_id)["emitted"] == run.total_events)

    wait_for(emitted_all, timeout_s, "the controller to emit the run's events")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tr", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Project:
    """A throwaway Trinity project folder with the repo's supervisor.conf."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "supervisor.conf"
        shutil.copy(ROOT / "supervisor.conf", self.config)
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")
        }
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["TRINITY_DATA_DIR"] = str(root)
        # No Prometheus endpoint unless a test asks for one: runs in parallel would all
        # try the default port.
        self.env["TRINITY_METRICS_PORT"] = "0"

    @property
    def db(self) -> Path:
        return root_db(self.root)

    @property
    def alerts_log(self) -> Path:
        return self.root / "logs" / "24h_test" / "alerts.log"

    def trinity(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "trinity"), *args], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.config), *args], cwd=self.root,
            env=self.env, capture_output=True, text=True, timeout=30,
        )

    def supervisor(self) -> Supervisor:
        return Supervisor(self.config)

    def kill(self) -> None:
        """After the test: kill -9 supervisord, then each of its processes, at once (a
        graceful stop waits out each agent's model call in flight, and what a stop does is
        tested by the tests that stop); then any other process of the project left over."""
        try:
            supervisor = self.supervisor()
            if supervisor.is_running():  # so its pid file is its own, not a stale one
                pids = [int(info["pid"]) for info in supervisor.process_info() if info["pid"]]
                pids.insert(0, int(supervisor.call("getPID")))
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                # Dead once a zombie (reaped when the system gets to it) or gone.
                wait_for(lambda: not any(_alive(pid) for pid in pids), 10,
                         "the project's processes to die")
        finally:
            cleanup_orphans(self.root)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def root_db(root: Path) -> Path:
    return root / "trinity_messages.db"


@pytest.fixture
def project(short_dir: Path) -> Iterator[Project]:
    proj = Project(short_dir)
    yield proj
    proj.kill()


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[FirestoreEmulator]:
    """One real Firestore emulator for the session; tests keep apart by project id or
    collection name."""
    need_emulator()
    emulator = FirestoreEmulator().start()
    yield emulator
    emulator.stop()


def hold_write_lock(db: Path, seconds: float) -> threading.Thread:
    """Another connection holds ``db``'s write lock for ``seconds`` (in a thread, started
    and holding it when this returns)."""
    locked = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            other.execute("COMMIT")
        finally:
            other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(5)
    return thread
