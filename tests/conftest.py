"""Shared fixtures: short temporary project folders and a real supervisord.

Unix socket paths are limited to ~107 bytes, so project folders live directly
under /tmp rather than under pytest's (long) tmp_path. In CI (``CI=true``) a
missing resource fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def root_db(root: Path) -> Path:
    return root / "trinity_messages.db"


@pytest.fixture
def project(short_dir: Path) -> Iterator[Project]:
    proj = Project(short_dir)
    yield proj
    try:
        proj.supervisor().stop()
    finally:
        cleanup_orphans(short_dir)


@pytest.fixture(scope="session")
def compressed_24h_run() -> Iterator[tuple[Project, subprocess.CompletedProcess[str]]]:
    """One finished compressed 24-hour run (time scale 2880, the hour-12 kill-and-resume
    included) shared by every test that reads a whole run's records: its project (the
    stores, ``logs/24h_test``) and the ``trinity run`` result. Runs once per session
    (~2 minutes), on first use; the folder is removed at the end of the session."""
    root = Path(tempfile.mkdtemp(prefix="t24", dir="/tmp"))
    proj = Project(root)
    try:
        result = proj.trinity("run", "--duration", "24", "--time-scale", "2880",
                              "--restart-at", "12", timeout=540)
        yield proj, result
    finally:
        try:
            proj.supervisor().stop()
        finally:
            cleanup_orphans(root)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[FirestoreEmulator]:
    """One real Firestore emulator for the session; tests keep apart by project id or
    collection name."""
    need_emulator()
    emulator = FirestoreEmulator().start()
    yield emulator
    emulator.stop()
