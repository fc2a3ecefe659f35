"""The three terminal dashboards on supervised runs: every figure shown equals the stores'
(each expected figure computed with the test's own queries,
tests/controller/reports/_dashboards.py), during a compressed run (its programs held still
while both are read), under tmux, and after the session's whole compressed run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Project, wait_for
from tests.controller.reports._dashboards import (
    AGENTS,
    assert_agent_rows,
    assert_clear,
    assert_shows,
    expected_cost,
    expected_patterns,
    expected_system,
    heartbeats,
    invoke,
    parse,
    read_only,
    render_text,
)
from tests.system.conftest import CompressedRun
from trinity.clock import now_ms
from trinity.controller.reports import dashboards
from trinity.controller.supervision.supervisord import supervisord_state
from trinity.settings import Settings

# -- a supervised run ----------------------------------------------------------------------


def _pids(project: Project) -> list[int]:
    return [p["pid"] for p in project.supervisor().process_info() if p["pid"]]


@pytest.mark.timeout(600)
def test_dashboards_during_a_compressed_run_and_under_tmux(project: Project) -> None:
    result = project.trinity("run", "--detach", "--duration", "12", "--time-scale", "720")
    assert result.returncode == 0, result.stdout + result.stderr
    root = project.root
    db = root / "trinity_messages.db"

    def executed() -> bool:
        conn = read_only(db)
        try:
            return bool(conn.execute("SELECT count(*) FROM outcomes WHERE delegate NOT IN"
                                     " ('witness', 'architect')").fetchone()[0] >= 2)
        finally:
            conn.close()

    wait_for(executed, 240, "two tasks executed")
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(root)})
    run_id = _run_id(root)
    # Hold every program still, so the stores do not move between the dashboard's read and
    # the test's own; the run goes on afterwards.
    pids = _pids(project)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        before, started = heartbeats(root), now_ms()
        views = {kind: dashboards.gather(kind, settings, None,
                                         lambda: supervisord_state(project.config))
                 for kind in dashboards.KINDS}
        ended = now_ms()
        shown = {kind: parse(render_text(view)) for kind, view in views.items()}
        assert shown["cost"]["RUN"] == f"{run_id} (active, time scale 720x)"
        assert_shows(shown["cost"], expected_cost(root, run_id))
        assert_shows(shown["patterns"], expected_patterns(root, run_id))
        assert_shows(shown["system"], expected_system(root, run_id))
        section = "AGENTS ALIVE (supervisord running)"
        assert_agent_rows(shown["system"], section, before, heartbeats(root), started, ended,
                          None)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    _under_tmux(project)


def _run_id(root: Path) -> str:
    conn = read_only(root / "trinity_messages.db")
    try:
        return str(conn.execute("SELECT run_id FROM runs ORDER BY started_ms DESC LIMIT 1"
                                ).fetchone()[0])
    finally:
        conn.close()


def _under_tmux(project: Project) -> None:
    """``dashboard system --live`` in a detached tmux session of fixed size: the panels are
    on its screen, the agents alive from their real heartbeats."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed")
    server = f"trdash{os.getpid()}"
    code = ("from trinity.cli.reports import dashboard; "
            "dashboard(['system', '--live'])")
    env = {**project.env, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color"}
    tmux = ["tmux", "-u", "-L", server]
    subprocess.run([*tmux, "-f", "/dev/null", "new-session", "-d", "-s", "dash", "-x", "110",
                    "-y", "45", f"{sys.executable} -c \"{code}\""], check=True, env=env,
                   cwd=project.root, timeout=30)
    try:
        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "dash"], env=env,
                                  capture_output=True, text=True, timeout=10).stdout

        def all_alive() -> str | None:
            text = screen()
            rows = [line for line in text.splitlines() if "last heartbeat" in line]
            return text if len(rows) == 3 and all("✓" in r for r in rows) else None

        text = wait_for(all_alive, 60, "three agents alive on the tmux screen")
        assert isinstance(text, str)
        for heading in ("TRINITY PROTOCOL - SYSTEM HEALTH", "UPTIME:", "MEMORY:", "CPU (avg):",
                        "DISK I/O:", "MESSAGE QUEUES:", "telemetry_stream", "DATABASE SIZES:",
                        "trinity_patterns.db", "AGENTS ALIVE (supervisord running):",
                        "refreshing every 0.5 s real (300 s simulated at time scale 720x)"):
            assert heading in text, text
        for agent in AGENTS:
            assert re.search(rf"^  {agent}\s+✓ \(last heartbeat: \d+\.\ds ago\)", text,
                             re.MULTILINE), text
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, timeout=30)


# -- after the session's whole compressed run ------------------------------------------------


@pytest.mark.timeout(900)
def test_dashboards_after_the_compressed_run(compressed_run: CompressedRun) -> None:
    project = compressed_run.project
    root = project.root
    run_id = _run_id(root)
    before = heartbeats(root)
    started = now_ms()
    results = {kind: invoke(root, kind) for kind in dashboards.KINDS}
    ended = now_ms()
    for kind, result in results.items():
        assert_clear(result, 0, dashboards.TITLES[kind])
    shown = {kind: parse(result.output) for kind, result in results.items()}
    assert_shows(shown["cost"], expected_cost(root, run_id))
    assert_shows(shown["patterns"], expected_patterns(root, run_id))
    assert_shows(shown["system"], expected_system(root, run_id))
    assert shown["cost"]["RUN"] == (
        f"{run_id} (completed, time scale {compressed_run.time_scale}x)")
    elapsed = f"{compressed_run.hours}h 00m 00s"
    assert shown["cost"]["ELAPSED"] == f"{elapsed} / {elapsed}"
    events = compressed_run.events
    assert shown["patterns"]["EVENTS PROCESSED"] == (
        f"{events} / {events} expected ({events} emitted)")
    # The run is over and supervisord stopped: no agent is alive, whatever its last beat.
    section = "AGENTS ALIVE (supervisord not running)"
    assert_agent_rows(shown["system"], section, before, heartbeats(root), started, ended, False)
