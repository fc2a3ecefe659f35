"""The four programs under a real supervisord: status, kill -9, silence, exactly-once."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time

import psutil
import pytest

from tests.conftest import Project, wait_for
from trinity.contract import PROCESSES as PROGRAMS
from trinity.stores.run_logs import read_alerts

pytestmark = pytest.mark.slow


def _statuses(project: Project) -> dict[str, tuple[str, int | None]]:
    out = project.supervisorctl("status").stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pid = int(parts[3].rstrip(",")) if len(parts) > 3 and parts[2] == "pid" else None
            found[parts[0]] = (parts[1], pid)
    return found


def _alerts(project: Project, kind: str) -> list[dict[str, object]]:
    return [a for a in read_alerts(project.alerts_log) if a.get("kind") == kind]


def _start(project: Project, *args: str) -> None:
    result = project.trinity("run", "--detach", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_programs_run_and_kill9_is_restarted_and_alerted(project: Project) -> None:
    _start(project, "--time-scale", "60")
    status = _statuses(project)
    for program in PROGRAMS:
        assert status[program][0] == "RUNNING", status
    for program in PROGRAMS:
        old_pid = _statuses(project)[program][1]
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        def restarted(program: str = program, old_pid: int = old_pid) -> bool:
            state, pid = _statuses(project).get(program, ("?", None))
            return state == "RUNNING" and pid not in (None, old_pid)

        wait_for(restarted, 15, f"supervisord to restart {program}")

        def alerted(program: str = program, old_pid: int = old_pid) -> bool:
            return any(a["agent"] == program and a["details"]["pid"] == str(old_pid)  # type: ignore[index]
                       for a in _alerts(project, "agent_crashed"))

        wait_for(alerted, 15, f"an agent_crashed alert for {program} pid {old_pid}")


def test_second_start_says_already_running(project: Project) -> None:
    _start(project)
    pid_before = project.supervisor().call("getPID")
    again = project.trinity("run", "--detach")
    assert again.returncode == 1
    assert "already running" in again.stdout
    assert project.supervisor().call("getPID") == pid_before


def test_sigstopped_agent_is_reported_silent_within_3_5_s(project: Project) -> None:
    # Self-healing off: a stopped agent would be restarted (tests/controller/test_healing.py).
    project.env["TRINITY_RESTART_INTENSITY"] = "0"
    _start(project)
    db = sqlite3.connect(project.db)

    def beating() -> bool:
        try:
            return bool(db.execute("SELECT count(*) FROM agents").fetchone()[0] == 3)
        except sqlite3.OperationalError:  # the first heartbeat creates the table
            return False

    wait_for(beating, 60, "heartbeats from all three agents")
    pid = _statuses(project)["architect"][1]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        alert = wait_for(lambda: _alerts(project, "agent_silent"), 10, "an agent_silent alert")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert isinstance(alert, list) and alert[0]["agent"] == "architect"
    last_beat_ms = db.execute(
        "SELECT last_heartbeat_ms FROM agents WHERE name='architect'").fetchone()[0]
    delay_s = (int(alert[0]["ts_ms"]) - last_beat_ms) / 1000
    # Three missed one-second beats, and no later than 3.5 s after the last one.
    assert 2.9 <= delay_s <= 3.5, delay_s
    wait_for(lambda: _alerts(project, "agent_recovered"), 10, "the agent_recovered alert")
    assert not [a for a in _alerts(project, "agent_silent") if a["agent"] != "architect"]
    db.close()


@pytest.mark.timeout(600)
def test_run_survives_kill9_of_every_process_exactly_once(project: Project) -> None:
    """Invariant 1 end to end: 12 events, random kill -9s, each outcome exactly once.

    ``make chaos`` (its short form in CI) does this at length, SIGSTOPs included, and
    audits every store; this is the quick form the test suite keeps."""
    _start(project, "--duration", "6", "--time-scale", "1800")
    rng = random.Random(7)
    db = sqlite3.connect(project.db)

    def status() -> str:
        return str(db.execute("SELECT status FROM runs").fetchone()[0])

    kills = 0
    deadline = time.monotonic() + 90
    while status() == "active" and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 2.0))
        program = rng.choice(PROGRAMS)
        pid = _statuses(project).get(program, ("?", None))[1]
        if pid is not None and status() == "active":
            os.kill(pid, signal.SIGKILL)
            kills += 1
    # Each event costs two model calls on the embedded model: the backlog drains after
    # the kills stop.
    wait_for(lambda: status() != "active", 420, "the run to end")
    assert status() == "completed"
    assert kills >= 5
    cycles = [c for (c,) in db.execute("SELECT cycle FROM events ORDER BY cycle")]
    assert cycles == list(range(1, 13))
    per_event = dict(db.execute(
        "SELECT e.event_id, count(o.task_id) FROM events e LEFT JOIN outcomes o"
        " USING(event_id) GROUP BY e.event_id"))
    assert set(per_event.values()) == {1}, per_event
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    crashed = {a["agent"] for a in _alerts(project, "agent_crashed")}
    assert crashed <= set(PROGRAMS) and crashed
    db.close()


def test_stop_cleans_up_after_a_killed_supervisord(project: Project) -> None:
    _start(project)
    sup = project.supervisor()
    children = [info["pid"] for info in sup.process_info()]
    supervisord_pid = int(sup.call("getPID"))
    os.kill(supervisord_pid, signal.SIGKILL)
    assert all(psutil.pid_exists(pid) for pid in children)  # orphaned, still running
    result = project.trinity("stop")
    assert result.returncode == 0, result.stderr

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert all(gone(pid) for pid in children)


def test_alerts_log_lines_are_json(project: Project) -> None:
    _start(project)
    pid = _statuses(project)["witness"][1]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _alerts(project, "agent_crashed"), 15, "an alert")
    for line in project.alerts_log.read_text().splitlines():
        entry = json.loads(line)
        assert {"alert_id", "ts", "kind", "severity", "message"} <= entry.keys()
