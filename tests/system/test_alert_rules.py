"""Each anomaly rule, triggered by creating its condition for real.

* queue_backlog: a supervised run, WITNESS stopped with SIGSTOP, 60 events emitted.
* detection_failure: a supervised run whose scenario gives the five pattern categories
  only benign operational texts, so WITNESS abstains on every one.
* cost_spike: a supervised run whose routing policy sends ARCHITECT's critical_error
  calls to an OpenAI-compatible fault server billing 60,000 gpt-5 output tokens.
* model_timeout: the same routing, the fault server answering only after the timeout.
* database_error: a supervised run whose pattern store is corrupted, and one whose
  journal is locked (BEGIN IMMEDIATE) for longer than the 10 s busy timeout.

Each alert is checked in alerts.log (kind, severity, details) and checked to be raised
once while its condition lasts. The memory rules, on child processes that allocate memory
on command, are tests/controller/process/test_alert_rules.py; the budget alerts have their
own test (tests/controller/process/test_budget.py).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from genai_prices import Usage, calc_price

from tests.agents.models.servers import OK, SLOW, Fault, FaultServer, RefusingPort
from tests.conftest import Project, wait_for
from tests.system.conftest import fresh_project, program_states
from trinity.contract import PROCESSES as PROGRAMS
from trinity.controller.process.rules import (
    BACKLOG_LIMIT,
    COST_SPIKE_USD_PER_HOUR,
    DETECTION_MIN_EVENTS,
    DETECTION_RATE_MIN,
)
from trinity.stores.run_logs import read_alerts

# Every text abstained on by WITNESS (best label "none"), in each category's shape.
BENIGN: dict[str, dict[str, Any]] = {
    # An empty error_type: WITNESS renders a non-empty one as "error type: ...", and beside
    # file and line even "Info" or "none" reads like an error report (critical_error,
    # p 0.54-0.80); this test needs events it abstains on.
    "critical_error": {"message": "Cache warmed: 12,408 keys loaded in 3.2s",
                       "severity": "info", "file": "cache.py", "line": 12,
                       "error_type": ""},
    "constitution_violation": {"message": "Cache warmed: 12,408 keys loaded in 3.2s",
                               "file": "cache.py", "line": 12, "severity": "info",
                               "violation_type": "none", "keywords": []},
    "feature_request": {"message": "Deployment of api v2.14.3 to production finished "
                                   "successfully", "source": "deploy", "priority": "low",
                        "complexity": "low"},
    "duplication": {"message": "Cache warmed: 12,408 keys loaded in 3.2s",
                    "files": ["cache.py"], "duplication_ratio": 0.0},
    "flaky_test": {"message": "Server started on port 8080", "test_file": "server.py",
                   "test_name": "startup", "failure_rate": 0},
    "none": {"message": "Server started on port 8080", "source": "app_log",
             "severity": "info"},
}
# The test plan's own critical error: WITNESS detects it (critical_error, p ~ 0.96).
CRITICAL = {"message": "Fatal error: NoneType in production payment processing",
            "severity": "critical", "file": "payments/stripe.py", "line": 142,
            "error_type": "AttributeError"}


# -- helpers ------------------------------------------------------------------------


def _pids(project: Project) -> dict[str, int | None]:
    status = program_states(project)
    assert all(status[p][0] == "RUNNING" for p in PROGRAMS), status
    return {p: status[p][1] for p in PROGRAMS}


def _alerts(project: Project, kind: str) -> list[dict[str, Any]]:
    return [a for a in read_alerts(project.alerts_log) if a.get("kind") == kind]


def _write_scenario(project: Project, overrides: dict[str, dict[str, Any]] | None = None
                    ) -> Path:
    """A scenario file (TRINITY_SCENARIO) with one variant per category."""
    variants = {**BENIGN, **(overrides or {})}
    path = project.root / "scenario.jsonl"
    path.write_text("".join(
        json.dumps({"category": c, "fields": f, "origin": "test_alert_rules"}) + "\n"
        for c, f in variants.items()))
    project.env["TRINITY_SCENARIO"] = str(path)
    return path


def _start(project: Project, *args: str) -> None:
    result = project.trinity("run", "--detach", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def _db(project: Project) -> sqlite3.Connection:
    return sqlite3.connect(project.db, timeout=30)


def _wait_for_agents(project: Project, db: sqlite3.Connection) -> None:
    def beating() -> bool:
        try:  # the controller creates the table once it is up
            return bool(db.execute("SELECT count(*) FROM agents").fetchone()[0] == 3)
        except sqlite3.OperationalError:
            return False

    wait_for(beating, 60, "heartbeats from all three agents")


def _run(db: sqlite3.Connection) -> tuple[str, float]:
    run_id, sim = db.execute(
        "SELECT run_id, sim_elapsed_s FROM runs WHERE status='active'").fetchone()
    return str(run_id), float(sim)


def _sim(db: sqlite3.Connection) -> float:
    return _run(db)[1]


def _wait_sim(db: sqlite3.Connection, until_s: float, timeout_s: float) -> None:
    wait_for(lambda: _sim(db) >= until_s, timeout_s, f"simulated time {until_s:.0f} s")


def _no_crash(project: Project, pids: dict[str, int | None]) -> None:
    assert _pids(project) == pids
    assert _alerts(project, "agent_crashed") == []


# -- queue_backlog ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_queue_backlog_fires_once_while_witness_is_stopped(project: Project) -> None:
    # Self-healing off: the stopped WITNESS would be restarted (tests/system/test_healing.py).
    project.env["TRINITY_RESTART_INTENSITY"] = "0"
    _write_scenario(project)
    # One scenario event a day: the backlog is the emitted events alone.
    _start(project, "--duration", "24", "--time-scale", "600", "--metrics-interval", "5",
           "--event-interval", "1440")
    db = _db(project)
    _wait_for_agents(project, db)
    pids = _pids(project)
    witness = pids["witness"]
    assert witness is not None
    events = project.root / "events.jsonl"
    events.write_text("".join(
        json.dumps({"event_id": f"burst-{n:02d}", "message": f"Cache warmed: {n} keys loaded",
                    "severity": "info"}) + "\n" for n in range(60)))
    os.kill(witness, signal.SIGSTOP)
    try:
        emitted = project.trinity("emit", "--quiet", str(events))
        assert emitted.returncode == 0, emitted.stdout + emitted.stderr
        (alert,) = wait_for(lambda: _alerts(project, "queue_backlog"), 15,  # type: ignore[misc]
                            "a queue_backlog alert")
        # The condition lasts: more samples (every 0.5 s), no second alert.
        sim = _sim(db)
        _wait_sim(db, sim + 1800, 15)
        assert len(_alerts(project, "queue_backlog")) == 1
    finally:
        os.kill(witness, signal.SIGCONT)
    run_id, _ = _run(db)
    assert alert["severity"] == "warning"
    assert alert["agent"] is None
    assert alert["run_id"] == run_id
    details = alert["details"]
    assert details["queue"] == "telemetry_stream"
    assert details["limit"] == BACKLOG_LIMIT == 50
    assert 60 <= details["pending"] <= 61  # the burst (and at most the day's one event)
    assert alert["alert_id"].startswith(f"backlog/{run_id}/telemetry_stream/h")
    assert "telemetry_stream" in alert["message"] and str(details["pending"]) in alert["message"]

    # WITNESS resumes and works the queue off: the rule re-arms, nothing new is raised.
    def drained() -> bool:
        head, cursor = db.execute(
            "SELECT s.head, c.seq FROM streams s JOIN cursors c USING(stream)"
            " WHERE stream='telemetry_stream' AND consumer='witness'").fetchone()
        return bool(head == cursor)

    wait_for(drained, 30, "WITNESS to apply the burst")
    sim = _sim(db)
    _wait_sim(db, sim + 1800, 15)
    assert len(_alerts(project, "queue_backlog")) == 1
    burst = db.execute("SELECT count(*) FROM outcomes WHERE event_id LIKE 'burst-%'").fetchone()
    assert burst[0] == 60
    _no_crash(project, pids)
    db.close()


# -- cost_spike -------------------------------------------------------------------------

PLAN = json.dumps({"summary": "Guard the payment processor against a missing charge",
                   "steps": ["check the charge is set", "add a regression test"],
                   "tasks": [{"description": "Return early when the charge is None",
                              "acceptance": "the regression test passes"}]})
OUTPUT_TOKENS = 60_000


def _gpt5_usd(input_tokens: int, output_tokens: int) -> float:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return float(calc_price(usage, model_ref="gpt-5", provider_id="openai").total_price)


@pytest.fixture
def cloud() -> Iterator[FaultServer]:
    server = FaultServer(Fault(OK, content=PLAN, prompt_tokens=1000,
                               completion_tokens=OUTPUT_TOKENS)).start()
    yield server
    server.stop()


@pytest.fixture
def refused() -> Iterator[str]:
    port = RefusingPort()
    yield port.url
    port.close()


def _route_critical_errors_to(project: Project, cloud: FaultServer, refused: str, *,
                              timeout_s: float = 20.0) -> None:
    """TRINITY_ROUTING: ARCHITECT's critical_error calls go to ``cloud`` (gpt-5 prices,
    key and URL from OPENAI_API_KEY / OPENAI_BASE_URL); every other call to a port that
    refuses connections (fails at once, costs nothing). The scenario's critical error is
    the plan's own, at cycle 1 (simulated hour 0); the other categories are benign."""
    routing = project.root / "routing.toml"
    routing.write_text(f"""
[call]
timeout_s = {timeout_s}
max_attempts = 1
backoff_s = []

[providers.cloud]
kind = "openai"
model = "gpt-5"
api_key_env = "OPENAI_API_KEY"
base_url_env = "OPENAI_BASE_URL"
price_model = "gpt-5"
price_provider = "openai"

[providers.offline]
kind = "openai"
model = "gpt-5"
api_key = "sk-test"
base_url = "{refused}/v1"
price_model = "gpt-5"

[[routes]]
agents = ["architect"]
patterns = ["critical_error"]
chain = ["cloud"]

[[routes]]
chain = ["offline"]
""")
    project.env.update({"TRINITY_ROUTING": str(routing), "OPENAI_API_KEY": "sk-test",
                        "OPENAI_BASE_URL": cloud.base_url})
    _write_scenario(project, {"critical_error": CRITICAL})


def _calls(project: Project, run_id: str) -> list[sqlite3.Row]:
    costs = sqlite3.connect(project.root / "trinity_costs.db", timeout=30)
    costs.row_factory = sqlite3.Row
    try:
        return costs.execute("SELECT * FROM calls WHERE run_id=? AND provider='cloud'",
                             (run_id,)).fetchall()
    finally:
        costs.close()


@pytest.mark.timeout(120)
def test_cost_spike_from_a_real_expensive_call_in_a_supervised_run(
        project: Project, cloud: FaultServer, refused: str) -> None:
    _route_critical_errors_to(project, cloud, refused)
    # Critical errors at cycles 1, 6, 11 ...: simulated hours 0, 10, 20.
    _start(project, "--duration", "24", "--time-scale", "600", "--event-interval", "120")
    db = _db(project)
    (alert,) = wait_for(lambda: _alerts(project, "cost_spike"), 60,  # type: ignore[misc]
                        "a cost_spike alert")
    run_id, _ = _run(db)
    (call,) = _calls(project, run_id)
    assert (call["agent"], call["status"]) == ("architect", "success")
    assert (call["input_tokens"], call["output_tokens"]) == (1000, OUTPUT_TOKENS)
    assert call["cost_usd"] == pytest.approx(_gpt5_usd(1000, OUTPUT_TOKENS), abs=1e-9)
    assert call["cost_usd"] > COST_SPIKE_USD_PER_HOUR
    assert len(cloud.hits) == 1

    assert alert["severity"] == "warning"
    assert alert["run_id"] == run_id
    assert alert["details"] == {"spent_last_hour_usd": round(call["cost_usd"], 6),
                                "limit_usd": COST_SPIKE_USD_PER_HOUR}
    assert alert["alert_id"].startswith(f"cost_spike/{run_id}/run/h")
    assert f"${call['cost_usd']:.2f}" in alert["message"]
    assert call["sim_elapsed_s"] <= alert["sim_elapsed_s"] < call["sim_elapsed_s"] + 3600
    # The spike lasts until the call is an hour old: one alert all along (and after).
    _wait_sim(db, float(call["sim_elapsed_s"]) + 3600 + 1200, 30)
    assert _sim(db) < 10 * 3600  # before the next critical error
    assert len(_alerts(project, "cost_spike")) == 1
    assert not [a for a in read_alerts(project.alerts_log)
                if str(a["kind"]).startswith("budget")]  # $0.60 of $10
    db.close()


@pytest.mark.timeout(120)
def test_model_timeout_alert_from_a_provider_that_does_not_answer(
        project: Project, cloud: FaultServer, refused: str) -> None:
    cloud.program(default=Fault(SLOW, delay_s=6.0))
    _route_critical_errors_to(project, cloud, refused, timeout_s=1.0)
    _start(project, "--duration", "24", "--time-scale", "600", "--event-interval", "120")
    db = _db(project)
    (alert,) = wait_for(lambda: _alerts(project, "model_timeout"), 60,  # type: ignore[misc]
                        "a model_timeout alert")
    run_id, _ = _run(db)
    (call,) = _calls(project, run_id)
    assert (call["agent"], call["status"], call["error_class"]) == (
        "architect", "timeout", "timeout")
    assert 1000 <= call["latency_ms"] < 4000
    assert alert["severity"] == "warning"
    assert alert["agent"] == "architect"
    assert alert["run_id"] == run_id
    assert alert["alert_id"] == f"model_timeout/{call['call_id']}"
    assert alert["details"]["call_id"] == call["call_id"]
    assert alert["details"]["provider"] == "cloud"
    assert alert["details"]["route"] == "primary"
    assert alert["details"]["event_id"] == f"{run_id}/c001"
    assert "timed out" in alert["message"]
    # No answer: the event's outcome is plan_failed, recorded once; one alert per call.
    wait_for(lambda: db.execute("SELECT status FROM outcomes WHERE event_id=?",
                                (f"{run_id}/c001",)).fetchall() == [("plan_failed",)], 30,
             "the plan_failed outcome")
    assert len(_alerts(project, "model_timeout")) == 1
    assert _alerts(project, "cost_spike") == []  # a timed-out call is not billed
    db.close()


# -- database_error ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_corrupt_pattern_store_is_a_database_error_and_the_controller_runs_on(
        project: Project) -> None:
    _write_scenario(project)
    _start(project, "--duration", "24", "--time-scale", "600", "--event-interval", "5")
    db = _db(project)
    _wait_for_agents(project, db)
    run_id, _ = _run(db)
    patterns_db = project.root / "trinity_patterns.db"
    wait_for(lambda: db.execute("SELECT count(*) FROM outcomes").fetchone()[0] >= 3, 30,
             "WITNESS to record detections")
    pids = _pids(project)
    witness = pids["witness"]
    assert witness is not None
    # In WAL mode the live pages (page 1 included) are in the -wal file, and a checkpoint
    # would write the good page 1 back over garbage: so WITNESS is paused, the WAL is
    # checkpointed into the file and emptied, and then the header is overwritten.
    os.kill(witness, signal.SIGSTOP)
    try:
        store = sqlite3.connect(patterns_db, timeout=10)
        assert store.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        store.close()
        assert os.path.getsize(f"{patterns_db}-wal") == 0
        with patterns_db.open("r+b") as fh:
            fh.write(os.urandom(100))
    finally:
        os.kill(witness, signal.SIGCONT)
    def by(agent: str) -> list[dict[str, Any]]:
        return [a for a in _alerts(project, "database_error") if a["agent"] == agent]

    wait_for(lambda: by("controller") and by("witness"), 20,
             "database_error alerts from the controller and from WITNESS")
    corrupted_at = _sim(db)
    # WITNESS cannot record its detections: the events wait (retried, not dead-lettered)
    # and its heartbeat says why.
    (from_witness,) = by("witness")
    assert from_witness["details"]["database"] == "trinity_patterns.db"
    assert "not a database" in from_witness["details"]["error"]
    (alert,) = by("controller")
    assert alert["severity"] == "error"
    assert alert["run_id"] == run_id
    assert alert["details"]["database"] == "trinity_patterns.db"
    assert alert["details"]["error_type"] == "DatabaseError"
    assert "not a database" in alert["details"]["error"]
    assert alert["message"].startswith("trinity_patterns.db: ")

    # The controller goes on: same pid, its run clock and its metrics snapshots advance.
    metrics = project.root / "logs" / "24h_test" / "metrics"
    before = len(list(metrics.glob("system_metrics_*.json")))
    _wait_sim(db, corrupted_at + 3600, 30)
    assert len(list(metrics.glob("system_metrics_*.json"))) >= before + 10
    assert program_states(project)["controller"] == ("RUNNING", pids["controller"])
    # One alert per database per minute while it lasts, not one per sample.
    errors = _alerts(project, "database_error")
    assert [a["agent"] for a in errors].count("controller") == 1, errors
    assert _alerts(project, "agent_crashed") == []
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    db.close()


# -- detection_failure, then a locked journal: one run WITNESS detects nothing in ------------


@pytest.fixture(scope="module")
def benign_run() -> Iterator[Project]:
    """A supervised run whose scenario gives the five pattern categories only benign
    texts (WITNESS abstains on every one: no model call), an event every 5 simulated
    minutes at 600x for 24 simulated hours (over two real minutes): the detection_failure
    test, then the locked-journal test, which waits for that alert before its lock."""
    with fresh_project("tab") as project:
        _write_scenario(project)
        _start(project, "--duration", "24", "--time-scale", "600", "--event-interval", "5")
        yield project


@pytest.mark.timeout(120)
def test_detection_failure_when_witness_abstains_on_every_pattern_event(
        benign_run: Project) -> None:
    project = benign_run
    db = _db(project)
    (alert,) = wait_for(lambda: _alerts(project, "detection_failure"), 60,  # type: ignore[misc]
                        "a detection_failure alert")
    run_id, _ = _run(db)
    assert alert["severity"] == "error"
    assert alert["agent"] == "witness"
    assert alert["run_id"] == run_id
    details = alert["details"]
    assert details["classified"] >= DETECTION_MIN_EVENTS == 5
    assert details["detected"] == 0
    assert details["detection_rate"] == 0.0 < DETECTION_RATE_MIN
    assert details["minimum"] == DETECTION_RATE_MIN == 0.8
    assert alert["alert_id"].startswith(f"detection/{run_id}/witness/h")
    assert f"0 of {details['classified']} pattern events" in alert["message"]
    # WITNESS really abstained: every classified event has its no_pattern outcome.
    abstained = db.execute(
        "SELECT count(*) FROM outcomes o JOIN events e USING(event_id)"
        " WHERE e.run_id=? AND e.category != 'none' AND o.status='no_pattern'",
        (run_id,)).fetchone()[0]
    assert abstained >= details["classified"]

    # The rate stays at 0 % over many more events: still one alert.
    target = details["classified"] + 15
    wait_for(lambda: db.execute(
        "SELECT count(*) FROM outcomes o JOIN events e USING(event_id)"
        " WHERE e.run_id=? AND e.category != 'none'", (run_id,)).fetchone()[0] >= target,
        60, f"{target} pattern events classified")
    sim = _sim(db)
    _wait_sim(db, sim + 900, 15)  # a few samples after the last one counted
    assert len(_alerts(project, "detection_failure")) == 1
    assert db.execute("SELECT count(*) FROM outcomes WHERE status != 'no_pattern'"
                      ).fetchone()[0] == 0  # no pattern detected, no model call
    db.close()


def _send_garbage(project: Project, to: str) -> None:
    """A malformed message on ``to``'s inbound socket (the agent dead-letters it)."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.setsockopt(zmq.LINGER, 1000)
        pub.connect(f"ipc://{project.root / '.run' / to}.sock")
        time.sleep(0.5)  # PUB/SUB: let the subscription arrive first
        pub.send_multipart([b"no_such_stream", b"not an envelope", b"{}"])
        time.sleep(0.2)
    finally:
        pub.close()
        ctx.term()


@pytest.mark.timeout(120)
def test_locked_journal_is_a_database_error_after_the_lock_and_nothing_crashes(
        benign_run: Project) -> None:
    """The journal write-locked for 12 s (> the 10 s busy timeout): the controller's own
    writes fail, and so does ARCHITECT's dead-lettering of a malformed message that
    arrives meanwhile (reported in its heartbeat). Both are alerted once the lock is
    gone, through the journal; no process dies. The run is the benign one (ARCHITECT
    stays idle: WITNESS detects nothing) the detection_failure test reads first."""
    project = benign_run
    db = _db(project)
    _wait_for_agents(project, db)
    # The run's one expected alert, applied before the lock: the controller's write that
    # meets the lock is then one of its own loop's (an emit, a checkpoint), not the
    # application of an alert, whose failure BusNode retries without reporting it.
    wait_for(lambda: _alerts(project, "detection_failure"), 60, "the detection_failure alert")
    pids = _pids(project)
    run_id, _ = _run(db)
    lock = sqlite3.connect(project.db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    locked_at = time.monotonic()
    try:
        # A write ARCHITECT must make while the lock is held: dead-lettering a message.
        _send_garbage(project, "architect")
        time.sleep(12.0 - (time.monotonic() - locked_at))
        assert _alerts(project, "database_error") == []  # nothing journaled meanwhile
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: {a["agent"] for a in _alerts(project, "database_error")}
             >= {"controller", "architect"}, 20,
             "database_error alerts of the controller and ARCHITECT")
    errors = _alerts(project, "database_error")
    agents = [a["agent"] for a in errors]
    assert len(agents) == len(set(agents)), errors  # one each, not one per failed write
    by_agent = {a["agent"]: a for a in errors}
    for agent in ("controller", "architect"):
        alert = by_agent[agent]
        assert alert["severity"] == "error"
        assert alert["run_id"] == run_id
        assert alert["details"]["database"] == "trinity_messages.db", alert
        assert "database is locked" in alert["details"]["error"], alert
        assert alert["message"].startswith("trinity_messages.db: ")
        assert ("while architect was applying messages" if agent == "architect"
                else "while running its loop") in alert["message"]
    # Journaled once the lock was gone (not written around the journal).
    log = (project.root / "logs" / "24h_test" / "trinity.log").read_text()
    assert "cannot journal alert" not in log
    head = db.execute("SELECT head FROM streams WHERE stream='alerts'").fetchone()[0]
    assert head >= len(read_alerts(project.alerts_log))
    # Nothing crashed, and the run goes on.
    done = db.execute("SELECT count(*) FROM outcomes").fetchone()[0]
    wait_for(lambda: db.execute("SELECT count(*) FROM outcomes").fetchone()[0] > done + 3, 20,
             "WITNESS to apply events again")
    _no_crash(project, pids)
    db.close()
