"""The controller's Prometheus /metrics in a real supervised run, scraped over HTTP: what
it says agrees with the stores (each expected value computed with the test's own SQL,
tests/controller/process/_prometheus.py), and a port in use does not stop the controller.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import Project, wait_for
from tests.controller.process._prometheus import (
    assert_agrees,
    assert_heartbeat_ages,
    assert_matches_ledger,
    assert_rss,
    expected_from_stores,
    heartbeat_table,
    ledger_totals,
    read_only,
    scrape_bracketed,
    scrape_http,
)
from trinity.contract import PROCESSES as PROGRAMS

# -- a real supervised run ------------------------------------------------------------


def _free_port() -> int:
    """A port free a moment ago (the endpoint's 0 means off, so the run needs a number);
    should another process take it meanwhile, the test fails on the logged error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _program_pids(project: Project) -> dict[str, int]:
    """The controller's and the agents' pids (crashwatch is supervisord's listener)."""
    found = {}
    for line in project.supervisorctl("status").stdout.splitlines():
        parts = line.split()
        if (len(parts) > 3 and parts[0] in PROGRAMS and parts[1] == "RUNNING"
                and parts[2] == "pid"):
            found[parts[0]] = int(parts[3].rstrip(","))
    return found


def _run_status(project: Project) -> str | None:
    if not project.db.exists():
        return None
    conn = read_only(project.db)
    try:
        row = conn.execute("SELECT status FROM runs").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def _log_lines(project: Project, needle: str) -> list[dict[str, object]]:
    path = project.root / "logs" / "24h_test" / "trinity.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if needle in line]


@pytest.mark.timeout(300)
def test_scrape_of_a_supervised_run_agrees_with_its_stores(project: Project) -> None:
    port = _free_port()
    project.env["TRINITY_METRICS_PORT"] = str(port)
    result = project.trinity("run", "--detach", "--duration", "1.5", "--time-scale", "1440")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: _log_lines(project, "metrics endpoint on"), 30, "the metrics endpoint")
    root = project.root

    # While the run goes on: every agent's heartbeat age and every process's RSS.
    wait_for(lambda: len(heartbeat_table(root)) == 3, 90, "heartbeats from all three agents")
    pids = _program_pids(project)
    beats_before = heartbeat_table(root)
    scrape, bounds = scrape_bracketed(lambda: scrape_http(port), pids)
    assert_heartbeat_ages(scrape, root, beats_before, heartbeat_table(root))
    ages = scrape.by_label("trinity_agent_heartbeat_age_seconds", "agent")
    assert max(ages.values()) < 3  # one beat a second, three missed = silent
    assert_rss(scrape, bounds)

    # Once the run has ended its records stop changing: the scrape must match them all.
    wait_for(lambda: _run_status(project) not in (None, "active"), 240, "the run to end")
    for _ in range(20):
        expected = expected_from_stores(root)
        scrape = scrape_http(port)
        if expected == expected_from_stores(root):  # nothing moved during the scrape
            break
        time.sleep(0.5)
    assert_agrees(scrape, expected)
    run_id = next(dict(k[1])["run_id"] for k in scrape.samples if k[0] == "trinity_run_info")
    assert_matches_ledger(scrape, ledger_totals(root, run_id))
    assert scrape.value("trinity_run_info", run_id=run_id, status="completed") == 1
    assert scrape.value("trinity_events_emitted_total") == 3
    assert scrape.value("trinity_events_with_outcome_total") == 3
    assert sum(scrape.by_label("trinity_detections_total", "pattern").values()) == 3
    assert sum(v for (n, _), v in scrape.samples.items()
               if n == "trinity_model_calls_total") >= 2  # ARCHITECT and EXECUTOR called
    assert not _log_lines(project, "cannot listen")

    # Stopping the controller closes the endpoint with it.
    project.supervisorctl("stop", "controller")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert _log_lines(project, "controller stopped cleanly")


@pytest.mark.timeout(180)
def test_a_port_in_use_does_not_stop_the_supervised_controller(project: Project) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        project.env["TRINITY_METRICS_PORT"] = str(port)
        result = project.trinity("run", "--detach", "--duration", "2", "--time-scale", "1440")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: _log_lines(project, "cannot listen"), 30,
                 "the port-in-use error in trinity.log")
        [error] = _log_lines(project, "cannot listen")
        assert error["level"] == "ERROR" and error["process"] == "controller"
        assert f"127.0.0.1:{port}" in str(error["msg"])
        controller = _program_pids(project)["controller"]
        # The controller goes on: it emits the run's events, on the same pid.
        conn = read_only(project.db)
        try:
            wait_for(lambda: conn.execute("SELECT count(*) FROM events").fetchone()[0] >= 2,
                     60, "the controller to emit events")
        finally:
            conn.close()
        assert _program_pids(project)["controller"] == controller
        assert len(_log_lines(project, "cannot listen")) == 1
