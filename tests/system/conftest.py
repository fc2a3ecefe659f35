"""Fixtures of the system tests: every test here starts real Trinity processes
(supervisord and its programs through ``trinity run``, agents or a controller spawned
directly, the bus's helper processes) and is marked ``slow`` by this folder.

* ``compressed_run``: one finished compressed run with a kill-and-resume in its middle,
  shared by every test that reads a whole run's records (the acceptance checks, report,
  export, dashboards); ``make demo`` and ``make bench-24h`` run the full 24 hours in CI.
* ``killed_run``: a finished run during which every program was kill -9ed, shared by the
  exactly-once check and the report that must say FAILED.
* These and ``secured_run`` (tests/system/test_security.py) are made once, on first
  use, and their folders removed at the end of the session. They run alone on the
  machine: a run sharing its cores with other tests misses heartbeats and alerts on
  them, as it should.
* ``fresh_project``: a project folder for a run that several tests share.
* ``procs``: the bus's helper processes (tests/bus/_publisher.py, _consumer.py).

The bus's folders and settings (``bus_data_dir``, ``bus_run_dir``, ``bus_settings``,
``zmq_ctx``) and the controller's webhook receivers (``serve``) are the unit tests'
fixtures, shared from their conftests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bus.conftest import (  # noqa: F401 - the bus tests' fixtures, shared
    bus_data_dir,
    bus_run_dir,
    bus_settings,
    zmq_ctx,
)
from tests.conftest import BIN, ROOT, Project, wait_for
from tests.controller.conftest import serve  # noqa: F401 - the webhook receivers, shared
from trinity.contract import PROGRAMS
from trinity.stores.run_logs import read_alerts

HERE = Path(__file__).resolve().parent
BUS_HELPERS = ROOT / "tests" / "bus"
PUBLISHER_SCRIPT = BUS_HELPERS / "_publisher.py"
CONSUMER_SCRIPT = BUS_HELPERS / "_consumer.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this folder is a multi-process run: ``-m slow`` selects exactly them."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def fresh_project(prefix: str = "tr") -> Iterator[Project]:
    """A throwaway project folder directly under /tmp (socket paths stay short), for a run
    shared by several tests; supervisord and its programs are killed and the folder is
    removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    project = Project(root)
    try:
        yield project
    finally:
        try:
            project.kill()
        finally:
            shutil.rmtree(root, ignore_errors=True)


# -- the shared runs ------------------------------------------------------------------


@dataclass(frozen=True)
class CompressedRun:
    """A finished ``trinity run --duration HOURS --restart-at RESTART_AT_H`` and what its
    plan makes of it: every count a test checks follows from these settings."""

    project: Project
    result: subprocess.CompletedProcess[str]
    hours: int
    restart_at_h: int
    time_scale: int
    event_interval_min: int = 30  # the defaults the run uses
    snapshot_interval_min: int = 60
    metrics_interval_min: int = 5

    @property
    def log_dir(self) -> Path:
        return self.project.root / "logs" / "24h_test"

    @property
    def events(self) -> int:
        return self.hours * 60 // self.event_interval_min

    @property
    def snapshots(self) -> int:
        """Cost and pattern snapshots: one at the start of each hour."""
        return self.hours * 60 // self.snapshot_interval_min

    @property
    def metrics_samples(self) -> int:
        return self.hours * 60 // self.metrics_interval_min


# The shared run: 8 simulated hours, the kill -9 of every process and --resume at hour 4.
# At 960x they take 30 real seconds, as the demo's 24 hours at 2880x do: the run is bound
# by its model calls (two per event, ~5 s an event here), and its hourly cost snapshots
# see the ledger grow before and after the restart (at 2880x all eight came before the
# first call was recorded).
COMPRESSED_HOURS = 8
COMPRESSED_RESTART_AT_H = 4
COMPRESSED_TIME_SCALE = 960


# What a user sends with `trinity emit` while the run goes on: a pattern and a line of
# normal operation. They belong to the run (every view shows them, marked external) and
# never to its plan's counts.
EXTERNAL_EVENTS = (
    {"event_id": "ci/ext-1", "message": "Fatal error: connection pool exhausted, checkout "
     "service returning HTTP 503 to every request", "severity": "critical"},
    {"event_id": "ci/ext-2", "message": "Build 4821 finished: 312 tests passed in 2m41s"},
)


def _compressed_run(cleanup: contextlib.ExitStack) -> CompressedRun:
    """One finished compressed run (time scale 960, the kill-and-resume half-way included)
    shared by every test that reads a whole run's records: its project (the stores,
    ``logs/24h_test``) and the ``trinity run`` result (~1.5 min). ``EXTERNAL_EVENTS`` are
    sent with ``trinity emit`` once the run is under way."""
    project = cleanup.enter_context(fresh_project("t24"))
    with subprocess.Popen(
            [str(BIN / "trinity"), "run", "--duration", str(COMPRESSED_HOURS),
             "--time-scale", str(COMPRESSED_TIME_SCALE), "--restart-at",
             str(COMPRESSED_RESTART_AT_H)], cwd=project.root, env=project.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) as proc:
        try:
            wait_for(lambda: _active_run(project) or proc.poll() is not None, 120,
                     "the run to start")
            events = project.root / "external.jsonl"
            events.write_text("".join(json.dumps(e) + "\n" for e in EXTERNAL_EVENTS))
            emitted = project.trinity("emit", str(events))
            assert emitted.returncode == 0, emitted.stdout + emitted.stderr
            stdout, stderr = proc.communicate(timeout=540)
        except BaseException:
            proc.kill()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return CompressedRun(project, result, COMPRESSED_HOURS, COMPRESSED_RESTART_AT_H,
                         COMPRESSED_TIME_SCALE)


def _active_run(project: Project) -> bool:
    """Whether the project's journal records a run under way (its events being emitted)."""
    if not project.db.exists():
        return False
    db = sqlite3.connect(project.db)
    try:
        return db.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:  # no run store yet
        return False
    finally:
        db.close()


@pytest.fixture(scope="session")
def compressed_run() -> Iterator[CompressedRun]:
    with contextlib.ExitStack() as cleanup:
        yield _compressed_run(cleanup)


def program_states(project: Project) -> dict[str, tuple[str, int | None]]:
    """Each program's state and pid, as ``supervisorctl status`` shows them."""
    found = {}
    for line in project.supervisorctl("status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pid = int(parts[3].rstrip(",")) if len(parts) > 3 and parts[2] == "pid" else None
            found[parts[0]] = (parts[1], pid)
    return found


def assert_each_event_done_once(project: Project, events: int) -> None:
    """The run's ``events`` cycles were each emitted once, in order, and each has exactly
    one outcome; nothing was dead-lettered."""
    db = sqlite3.connect(project.db)
    try:
        cycles = [c for (c,) in db.execute("SELECT cycle FROM events ORDER BY cycle")]
        assert cycles == list(range(1, events + 1))
        per_event = dict(db.execute(
            "SELECT e.event_id, count(o.task_id) FROM events e LEFT JOIN outcomes o"
            " USING(event_id) GROUP BY e.event_id"))
        assert set(per_event.values()) == {1}, per_event
        assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    finally:
        db.close()


def crashed_programs(project: Project) -> set[str]:
    return {str(a["agent"]) for a in read_alerts(project.alerts_log)
            if a.get("kind") == "agent_crashed"}


@dataclass(frozen=True)
class KilledRun:
    """A finished run whose programs were kill -9ed while its events were in flight."""

    project: Project
    events: int
    killed: list[str]  # the programs killed, in order
    stopped: subprocess.CompletedProcess[str]  # ``trinity stop`` once the run was over


# Two rounds, each killing every program once in a seeded random order, 0.5-2 s apart.
KILL_ROUNDS = 2


def _killed_run(cleanup: contextlib.ExitStack) -> KilledRun:
    """4 events (2 simulated hours at 1800x) while every program, the controller included,
    is kill -9ed twice; the run drains and ends, its crash alerts reach alerts.log, then
    ``trinity stop``. ``make chaos`` (its short form in CI) does this at length."""
    project = cleanup.enter_context(fresh_project("tk"))
    started = subprocess.run(
        [str(BIN / "trinity"), "run", "--detach", "--duration", "2", "--time-scale",
         "1800"], cwd=project.root, env=project.env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stdout + started.stderr
    rng = random.Random(7)
    db = sqlite3.connect(project.db)

    def status() -> str:
        return str(db.execute("SELECT status FROM runs").fetchone()[0])

    def running_pid(program: str) -> int | None:
        """The program's pid once supervisord calls it RUNNING again (after startsecs)."""
        state, pid = program_states(project).get(program, ("?", None))
        return pid if state == "RUNNING" else None

    killed: list[str] = []
    try:
        for program in [p for _ in range(KILL_ROUNDS)
                        for p in rng.sample(PROGRAMS, len(PROGRAMS))]:
            time.sleep(rng.uniform(0.5, 2.0))
            pid = wait_for(lambda p=program: running_pid(p) or status() != "active", 20,
                           f"{program} RUNNING")
            if status() != "active":
                break
            os.kill(int(pid), signal.SIGKILL)
            killed.append(program)
        # Each event costs two model calls on the embedded model: the backlog drains after
        # the kills stop.
        wait_for(lambda: status() != "active", 420, "the run to end")
    finally:
        db.close()
    # The controller writes the crash alerts crashwatch journals: give the last ones a
    # moment (the tests check them).
    deadline = time.monotonic() + 15
    while crashed_programs(project) != set(killed) and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped = project.trinity("stop")
    return KilledRun(project, 4, killed, stopped)


@pytest.fixture(scope="session")
def killed_run() -> Iterator[KilledRun]:
    with contextlib.ExitStack() as cleanup:
        yield _killed_run(cleanup)


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
def procs(bus_data_dir: Path, bus_run_dir: Path) -> Iterator[Procs]:  # noqa: F811
    p = Procs(bus_data_dir, bus_run_dir)
    yield p
    p.cleanup()
