"""Snapshots, persistence checks, rules and run logs, on real SQLite stores (no processes)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from trinity import measures
from trinity.bus.journal import Journal
from trinity.bus.message import Message
from trinity.clock import now_ms
from trinity.controller.ops import run as runner
from trinity.controller.process import snapshots
from trinity.controller.process.alerts import alert_of
from trinity.controller.process.rules import BACKLOG_LIMIT, COST_SPIKE_USD_PER_HOUR, Rules
from trinity.controller.reports import criteria, persistence
from trinity.db import open_readonly
from trinity.settings import Settings
from trinity.stores import run_logs, runs
from trinity.stores.costs import CallRecord, CostLedger
from trinity.stores.run_logs import AlertLog, read_alerts


@pytest.fixture
def settings(short_dir: Path) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})


def _call(run_id: str, n: int, *, cost: float = 0.0, sim: float = 0.0, agent: str = "architect",
          event_id: str | None = None, task_id: str | None = None) -> CallRecord:
    return CallRecord(
        call_id=f"call-{n}", request_id=f"req-{n}", attempt=1, route="primary", ts_ms=now_ms(),
        sim_elapsed_s=sim, run_id=run_id, agent=agent, provider="cloud", provider_kind="openai",
        model="gpt-5", local=False, input_tokens=100, output_tokens=50, cached_tokens=0,
        reasoning_tokens=0, tokens_estimated=False, cost_usd=cost, latency_ms=12.0,
        status="success", error_class=None, error=None, event_id=event_id, task_id=task_id)


def _run_with_events(settings: Settings, cycles: int) -> tuple[Journal, runs.Run]:
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {"time_scale": 1, "duration_h": 24,
                                         "event_interval_min": 30})
    with journal.transaction() as tx:
        for cycle in range(1, cycles + 1):
            event_id = f"{run.run_id}/c{cycle:03d}"
            tx.publish("telemetry_stream", b'{"message": "x"}', key=event_id)
            tx.conn.execute(
                "INSERT INTO events(event_id, run_id, cycle, category, emitted_ms, sim_elapsed_s)"
                " VALUES (?, ?, ?, 'critical_error', ?, ?)",
                (event_id, run.run_id, cycle, now_ms(), (cycle - 1) * 1800.0))
    journal.declare("telemetry_stream", ["witness"])
    return journal, run


def _patterns_db(settings: Settings, run_id: str, detected: dict[str, str | None]) -> None:
    """A pattern store with the tables the controller reads (as WITNESS creates them)."""
    conn = sqlite3.connect(settings.patterns_db)
    conn.execute("CREATE TABLE exemplars (id INTEGER PRIMARY KEY, label TEXT, text TEXT,"
                 " source TEXT, origin TEXT, event_id TEXT UNIQUE, confidence REAL,"
                 " session_id TEXT, created_ms INTEGER, vector BLOB)")
    conn.execute("CREATE TABLE detections (event_id TEXT PRIMARY KEY, run_id TEXT,"
                 " session_id TEXT, pattern TEXT, label TEXT, confidence REAL,"
                 " detected_ms INTEGER, nearest_id INTEGER, nearest_similarity REAL,"
                 " cross_session INTEGER, latency_ms REAL)")
    conn.execute("CREATE TABLE patterns (pattern TEXT PRIMARY KEY, detections INTEGER,"
                 " confidence_sum REAL, first_seen_ms INTEGER, last_seen_ms INTEGER,"
                 " cross_session_matches INTEGER)")
    conn.execute("INSERT INTO exemplars(label, text, source, session_id, created_ms, vector)"
                 " VALUES ('critical_error', 'seed', 'seed', 's', 0, x'00')")
    for n, (event_id, pattern) in enumerate(detected.items()):
        conn.execute("INSERT INTO detections VALUES (?, ?, 's', ?, ?, ?, ?, NULL, NULL, 0, 1.0)",
                     (event_id, run_id, pattern, pattern or "none", 0.8 + n * 0.01, now_ms()))
        if pattern:
            conn.execute("INSERT INTO exemplars(label, text, source, event_id, session_id,"
                         " created_ms, vector) VALUES (?, 't', 'detected', ?, 's', 0, x'00')",
                         (pattern, event_id))
            conn.execute("INSERT INTO patterns VALUES (?, 1, 0.8, 0, 0, 0) ON CONFLICT(pattern)"
                         " DO UPDATE SET detections=detections+1", (pattern,))
    conn.commit()
    conn.close()


def test_snapshot_names_are_elapsed_simulated_time() -> None:
    assert run_logs.hhmmss(0) == "000000"
    assert run_logs.hhmmss(5 * 60) == "000500"
    assert run_logs.hhmmss(12 * 3600 + 35 * 60 + 22) == "123522"
    assert run_logs.hhmmss(30 * 3600) == "300000"  # runs longer than a day keep counting
    path = run_logs.snapshot_path(Path("/logs"), "costs", 3600)
    assert path == Path("/logs/costs/cost_snapshot_010000.json")


def test_write_json_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "system_metrics_000500.json"
    run_logs.write_json(path, {"a": 1})
    run_logs.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_cost_snapshot_is_computed_from_the_ledger(settings: Settings) -> None:
    ledger = CostLedger(settings.costs_db)
    try:
        ledger.record(_call("r1", 1, cost=0.30, sim=100, agent="architect"))
        ledger.record(_call("r1", 2, cost=0.45, sim=4000, agent="executor"))
        ledger.record(_call("other", 3, cost=9.0, sim=4000, agent="executor"))
        snap = snapshots.cost_snapshot(ledger.totals("r1"), ledger.spent_since("r1", 3600), 10.0)
    finally:
        ledger.close()
    assert snap["summary"] == {"total_cost_usd": 0.75, "total_calls": 2, "success_rate": 1.0,
                               "by_agent": {"WITNESS": 0.0, "ARCHITECT": 0.3, "EXECUTOR": 0.45}}
    assert snap["cost_last_hour_usd"] == 0.45
    assert snap["budget_used_pct"] == 7.5


def test_pattern_stats_score_against_the_ground_truth(settings: Settings) -> None:
    journal, run = _run_with_events(settings, 4)
    ids = [f"{run.run_id}/c{c:03d}" for c in range(1, 5)]
    _patterns_db(settings, run.run_id, {ids[0]: "critical_error", ids[1]: "duplication",
                                        ids[2]: None})
    conn = open_readonly(settings.patterns_db)
    try:
        stats = measures.pattern_stats(journal.conn, conn, run.run_id, 3600.0, 3600.0)
    finally:
        conn.close()
        journal.close()
    assert stats["detections"]["total"] == 2
    assert stats["detections"]["by_type"]["critical_error"] == 1
    assert stats["detections"]["by_type"]["duplication"] == 1
    assert stats["scoring"]["events_classified"] == 3
    assert stats["scoring"]["detection_rate"] == round(2 / 3, 4)
    assert stats["scoring"]["accuracy"] == round(1 / 3, 4)
    # Events c001 and c002 were emitted at 0 and 1800 s: only c002 lies in (0, 3600].
    assert stats["learning"]["new_patterns_this_hour"] == 1
    assert stats["learning"]["total_patterns"] == 3


def test_validate_finds_a_lost_message_and_a_store_that_went_back(settings: Settings) -> None:
    journal, run = _run_with_events(settings, 3)
    _patterns_db(settings, run.run_id, {f"{run.run_id}/c001": "critical_error"})
    CostLedger(settings.costs_db).close()
    before, problems = persistence.validate(settings)
    assert problems == [] and before is not None
    assert before["last_cycle"] == 3 and before["queues"]["telemetry_stream->witness"] == {
        "head": 3, "cursor": 0}
    # An unapplied message vanishes from the journal, and the pattern store loses rows.
    journal.conn.execute("DELETE FROM messages WHERE seq=2")
    journal.close()
    conn = sqlite3.connect(settings.patterns_db)
    conn.execute("DELETE FROM exemplars WHERE source='detected'")
    conn.commit()
    conn.close()
    _, problems = persistence.validate(settings, before)
    assert any("1 of 3 unapplied messages missing" in p for p in problems), problems
    assert any("pattern store exemplars went down" in p for p in problems), problems


def test_validate_reports_missing_stores(settings: Settings) -> None:
    journal, _ = _run_with_events(settings, 1)
    journal.close()
    _, problems = persistence.validate(settings)
    assert f"{settings.patterns_db.name} is missing from {settings.data_dir}" in problems
    assert f"{settings.costs_db.name} is missing from {settings.data_dir}" in problems


def test_rules_fire_on_the_edge_and_rearm() -> None:
    rules = Rules("r1")
    assert rules.backlog({"telemetry_stream": BACKLOG_LIMIT}, 0) == []
    fired = rules.backlog({"telemetry_stream": BACKLOG_LIMIT + 1}, 0)
    assert [a.kind for a in fired] == ["queue_backlog"]
    assert fired[0].details["pending"] == BACKLOG_LIMIT + 1
    assert rules.backlog({"telemetry_stream": 80}, 300) == []       # still high: no repeat
    assert rules.backlog({"telemetry_stream": 3}, 600) == []        # cleared
    assert len(rules.backlog({"telemetry_stream": 70}, 7200)) == 1  # high again: re-armed
    assert rules.cost_spike(COST_SPIKE_USD_PER_HOUR, 0) == []
    assert [a.kind for a in rules.cost_spike(0.51, 0)] == ["cost_spike"]
    few = {"detection_rate": 0.25, "pattern_events_classified": 4, "detected": 1}
    assert rules.detection(few, 0) == []  # too few events to judge
    many = {"detection_rate": 0.5, "pattern_events_classified": 6, "detected": 3}
    assert [a.kind for a in rules.detection(many, 0)] == ["detection_failure"]
    limit = rules.memory({"architect": 501.0}, {}, 0)
    assert [a.kind for a in limit] == ["memory_limit"]


def test_alert_ids_are_stable_for_a_restarted_controller() -> None:
    first = Rules("r1").backlog({"execution_queue": 60}, 3700)
    again = Rules("r1").backlog({"execution_queue": 60}, 3900)
    assert first[0].alert_id == again[0].alert_id  # alerts.log keeps it once


@pytest.mark.parametrize("alert_id", [None, "", "  ", 7])
def test_alerts_without_a_usable_id_are_each_written(tmp_path: Path, alert_id: Any) -> None:
    log = AlertLog(tmp_path / "alerts.log")
    for n in (1, 2):
        body = json.dumps({"alert_id": alert_id, "kind": "x", "message": f"alert {n}"})
        msg = Message("alerts", n, f"m{n}", "test", now_ms(), body.encode())
        assert log.write_alert(alert_of(msg), source=msg.source)
        assert not log.write_alert(alert_of(msg), source=msg.source)  # again: once
    assert [a["message"] for a in read_alerts(tmp_path / "alerts.log")] == ["alert 1", "alert 2"]


def test_archive_moves_the_previous_run_out_of_the_log_dir(tmp_path: Path) -> None:
    logs = tmp_path / "logs" / "24h_test"
    (logs / "costs").mkdir(parents=True)
    (logs / "costs" / "cost_snapshot_000000.json").write_text("{}")
    (logs / "test_config.json").write_text(json.dumps({"run_id": "old-run"}))
    (logs / "notes.txt").write_text("the user's own file stays")
    (logs / "bug_report_old-run.md").write_text("# the failed run's draft goes with it")
    target = run_logs.archive(logs)
    assert target == tmp_path / "logs" / "archive" / "old-run"
    assert (target / "costs" / "cost_snapshot_000000.json").exists()
    assert (target / "bug_report_old-run.md").exists()
    assert sorted(p.name for p in logs.iterdir()) == ["notes.txt"]
    assert run_logs.archive(logs) is None


def test_test_config_redacts_secrets(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setenv("TRINITY_ALERT_WEBHOOK", "https://user:pw@hooks.example.com/T1/B2?k=v")
    hooked = settings.replace(alert_webhook="https://user:pw@hooks.example.com/T1/B2?k=v")
    journal, run = _run_with_events(settings, 1)
    journal.close()
    config = tmp_path / "supervisor.conf"
    config.write_text("")
    path = runner.write_test_config(hooked, run, config, resumed=False)
    text = path.read_text()
    assert "sk-secret-value" not in text and "pw@" not in text and "T1/B2" not in text
    document: dict[str, Any] = json.loads(text)
    assert document["secrets"]["OPENAI_API_KEY"] == "set (redacted)"
    assert document["run_id"] == run.run_id and document["resumed_ms"] == []
    again = json.loads(runner.write_test_config(hooked, run, config, resumed=True).read_text())
    assert len(again["resumed_ms"]) == 1


def test_criteria_fail_without_metrics_and_pass_the_recorded_ones(settings: Settings) -> None:
    journal, run = _run_with_events(settings, 2)
    ids = [f"{run.run_id}/c{c:03d}" for c in (1, 2)]
    _patterns_db(settings, run.run_id, {ids[0]: "critical_error", ids[1]: "critical_error"})
    CostLedger(settings.costs_db).close()
    journal.close()
    _, found = criteria.evaluate(settings, run.run_id)
    by_name = {c.name: c for c in found}
    assert by_name["100% Event Detection"].passed
    assert by_name["Zero Crashes"].passed
    assert not by_name["Memory Stability"].passed  # no metrics sample: not assumed
    assert not criteria.mandatory_passed(found)
    sample = {"run_id": run.run_id, "memory_max_process_rss_mb": 612.0,
              "queues": {"telemetry_stream": 2}}
    run_logs.write_json(run_logs.snapshot_path(settings.log_dir, "metrics", 0), sample)
    _, found = criteria.evaluate(settings, run.run_id)
    by_name = {c.name: c for c in found}
    assert not by_name["Memory Stability"].passed and by_name["Memory Stability"].value == 612
    assert by_name["Queue Health"].passed


def test_a_completed_run_records_its_whole_simulated_duration(settings: Settings) -> None:
    """The run's last checkpoint may come up to half a real second before its end; the
    run records its whole simulated time when it ends, so the report's "simulated of
    planned" and every view read the full duration (here the only other checkpoint is the
    one at the start: the controller's own clock is held still, and the run's simulated
    clock is moved by hand, so no machine is too slow for it)."""
    from tests.conftest import emit_every_event
    from trinity.clock import ManualClock
    from trinity.controller.process.controller import Controller

    settings = settings.replace(metrics_port=0)
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {"time_scale": 1e6, "duration_h": 1.0,
                                         "event_interval_min": 30.0, "noise_events": 0})
    controller = Controller(settings, clock=ManualClock())
    controller.initialize()
    assert controller.driver is not None
    sim_clock = ManualClock(now_s=1800.0)  # the second (last) event is due at 30 minutes
    controller.driver.clock = sim_clock
    try:
        emit_every_event(controller, journal, run)
        assert runs.get_run(journal.conn, run.run_id).sim_elapsed_s == 1800.0  # type: ignore[union-attr]
        sim_clock.advance(1800.0 + 0.25)  # the hour is over; no checkpoint has seen it
        with journal.transaction() as tx:
            for event in runs.events(tx.conn, run.run_id):
                runs.record_outcome(tx.conn, task_id=f"{event.event_id}/no_pattern",
                                    event_id=event.event_id, run_id=run.run_id,
                                    delegate="witness", status="no_pattern", product=None)
        for _ in range(100):
            controller.tick()
            if controller.driver is None or controller.driver.ended:
                break
        ended = runs.get_run(journal.conn, run.run_id)
        assert ended is not None and ended.status == runs.COMPLETED
        assert ended.sim_elapsed_s == 3600.0
    finally:
        controller.shutdown()
        journal.close()
