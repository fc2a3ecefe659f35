"""The five programs under a real supervisord: status, kill -9, silence, exactly-once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

import psutil
import pytest

from tests.conftest import Project, wait_for
from tests.system.conftest import (
    KilledRun,
    assert_each_event_done_once,
    crashed_programs,
    program_states,
)
from trinity.contract import PROGRAMS
from trinity.stores.run_logs import read_alerts


def _alerts(project: Project, kind: str) -> list[dict[str, object]]:
    return [a for a in read_alerts(project.alerts_log) if a.get("kind") == kind]


def _start(project: Project, *args: str) -> None:
    result = project.trinity("run", "--detach", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_programs_run_and_kill9_is_restarted_and_alerted(project: Project) -> None:
    _start(project, "--time-scale", "60")
    status = program_states(project)
    for program in PROGRAMS:
        assert status[program][0] == "RUNNING", status
    for program in PROGRAMS:
        old_pid = program_states(project)[program][1]
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        def restarted(program: str = program, old_pid: int = old_pid) -> bool:
            state, pid = program_states(project).get(program, ("?", None))
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
    # Self-healing off: a stopped agent would be restarted (tests/system/test_healing.py).
    project.env["TRINITY_RESTART_INTENSITY"] = "0"
    _start(project)
    db = sqlite3.connect(project.db)

    def beating() -> bool:
        try:
            return bool(db.execute("SELECT count(*) FROM agents").fetchone()[0] == 3)
        except sqlite3.OperationalError:  # the first heartbeat creates the table
            return False

    wait_for(beating, 60, "heartbeats from all three agents")
    pid = program_states(project)["architect"][1]
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
def test_run_survives_kill9_of_every_process_exactly_once(killed_run: KilledRun) -> None:
    """Invariant 1 end to end: 4 events, every program kill -9ed at least once while they
    are in flight (the session's ``killed_run``: two rounds, each killing the four in a
    seeded random order, 0.5-2 s apart), each outcome exactly once.

    ``make chaos`` (its short form in CI) does this at length, SIGSTOPs included, and
    audits every store; this is the quick form the test suite keeps."""
    project, killed = killed_run.project, killed_run.killed
    assert len(killed) >= 5 and set(killed) == set(PROGRAMS), killed
    db = sqlite3.connect(project.db)
    try:
        assert db.execute("SELECT status FROM runs").fetchone()[0] == "completed"
    finally:
        db.close()
    assert_each_event_done_once(project, killed_run.events)
    # Every kill is an unexpected exit, alerted as a crash of that program.
    assert crashed_programs(project) == set(PROGRAMS)


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
    pid = program_states(project)["witness"][1]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _alerts(project, "agent_crashed"), 15, "an alert")
    for line in project.alerts_log.read_text().splitlines():
        entry = json.loads(line)
        assert {"alert_id", "ts", "kind", "severity", "message"} <= entry.keys()
