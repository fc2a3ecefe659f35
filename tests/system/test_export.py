"""``trinity export --format csv`` of the session's compressed run: exactly what was
recorded, each file checked against the stores and snapshot files independently."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.controller.reports._export import FILES, export_cli, query, read_csv
from tests.system.conftest import EXTERNAL_EVENTS, CompressedRun
from trinity.controller.reports import criteria
from trinity.settings import Settings
from trinity.stores.run_logs import read_alerts


@pytest.mark.timeout(600)
def test_compressed_run_exports_exactly_what_was_recorded(
        compressed_run: CompressedRun, tmp_path: Path) -> None:
    project = compressed_run.project
    events_planned, samples = compressed_run.events, compressed_run.metrics_samples
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(project.root)})
    result = export_cli(settings, "--format", "csv", "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    run_id = query(settings.messages_db, "SELECT run_id FROM runs")[0][0]
    tables = {name: read_csv(tmp_path / name)[1] for name in FILES}
    counts = {name: int(line.rsplit(": ", 1)[1].split()[0])
              for name, line in zip(FILES, result.output.splitlines(), strict=True)}
    assert counts == {name: len(rows) for name, rows in tables.items()}

    # events: the run's scheduled events, each classified, as in the two stores; then the
    # external ones sent with trinity emit during the run, marked, with no ground truth
    rows = tables["events.csv"]
    events = [r for r in rows if r["external"] == "false"]
    external = [r for r in rows if r["external"] == "true"]
    assert rows == events + external
    assert [r["event_id"] for r in external] == [e["event_id"] for e in EXTERNAL_EVENTS]
    assert all(r["cycle"] == r["event_type"] == "" and r["detected_at"] for r in external)
    stored = dict(query(settings.messages_db, "SELECT event_id, category FROM events"
                                               " WHERE run_id=?", run_id))
    assert len(events) == len(stored) == events_planned
    assert {r["event_id"]: r["event_type"] for r in events} == stored
    assert [int(r["cycle"]) for r in events] == list(range(1, events_planned + 1))
    detections = {e: (p or "", c) for e, p, c in query(
        settings.patterns_db, "SELECT event_id, pattern, confidence FROM detections"
        " WHERE run_id=?", run_id)}
    assert {r["event_id"]: (r["detected_pattern"], float(r["confidence"]))
            for r in rows} == detections
    assert all(int(r["detection_latency_ms"]) > 0 for r in events)

    # what the report says, recomputed from the CSV, equals the criteria from the stores
    _, measured = criteria.evaluate(settings, run_id)
    value = {c.name: c.value for c in measured}
    classified = [r for r in events if r["detected_at"]]
    assert len(classified) == value["100% Event Detection"] == events_planned
    correct = sum((r["detected_pattern"] or "none") == r["event_type"] for r in classified)
    assert round(correct / len(classified), 4) == value["Detection Accuracy"]
    latency_s = sum(int(r["detection_latency_ms"]) for r in classified) / len(classified) / 1000
    assert latency_s == pytest.approx(value["Detection Latency"], abs=1e-9)

    # outcomes: every recorded one, once; each event has at least one
    outcomes = tables["outcomes.csv"]
    (expected_outcomes,) = query(settings.messages_db, "SELECT count(*) FROM outcomes o JOIN"
                                  " events e USING(event_id) WHERE e.run_id=?", run_id)[0]
    mine = [r for r in outcomes if r["external"] == "false"]
    assert len(mine) == expected_outcomes >= events_planned
    assert {r["event_id"] for r in mine} == set(stored)
    theirs = [r for r in outcomes if r["external"] == "true"]
    assert {r["event_id"] for r in theirs} == {r["event_id"] for r in external}
    assert all(r["task_id"] == "" for r in outcomes if r["status"] == "no_pattern")
    assert all(r["task_id"] for r in outcomes if r["status"] != "no_pattern")

    # llm_calls: the ledger's rows of the run; every hourly cost snapshot is a prefix of them
    calls = tables["llm_calls.csv"]
    (ledger_rows,) = query(settings.costs_db, "SELECT count(*) FROM calls WHERE run_id=?",
                            run_id)[0]
    assert len(calls) == ledger_rows > 0
    snaps = sorted((project.root / "logs" / "24h_test" / "costs").glob("cost_snapshot_*.json"))
    assert len(snaps) == compressed_run.snapshots
    for path in snaps:
        snap = json.loads(path.read_text())
        prefix = calls[:snap["summary"]["total_calls"]]
        assert len(prefix) == snap["summary"]["total_calls"], path.name
        assert sum(int(r["input_tokens"]) for r in prefix) == snap["input_tokens"], path.name
        assert sum(int(r["output_tokens"]) for r in prefix) == snap["output_tokens"], path.name
        assert dict(Counter(r["agent"] for r in prefix)) == snap["calls_by_agent"], path.name
        assert {s: sum(r["status"] == s for r in prefix) for s in snap["by_status"]} == (
            snap["by_status"]), path.name
        assert round(sum(float(r["cost_usd"]) for r in prefix), 6) == (
            snap["summary"]["total_cost_usd"]), path.name
    last = json.loads(snaps[-1].read_text())
    assert last["summary"]["total_calls"] <= len(calls)

    # alerts: the kill half-way is recorded once, and nothing of another run
    alerts = tables["alerts.csv"]
    assert [r["kind"] for r in alerts].count("deliberate_restart") == 1
    assert all(r["run_id"] in ("", run_id) for r in alerts)
    logged = read_alerts(project.alerts_log)
    assert len(alerts) == sum(a.get("run_id") in (None, run_id) for a in logged)

    # metrics: the five-minute samples, in time order, values as in their files
    metrics = tables["metrics.csv"]
    assert len(metrics) == samples
    (recorded_samples,) = query(settings.messages_db, "SELECT count(*) FROM snapshots"
                                 " WHERE run_id=? AND kind='metrics'", run_id)[0]
    assert recorded_samples == samples
    hours = [float(r["elapsed_hours"]) for r in metrics]
    assert hours == sorted(hours) and len(set(hours)) == samples
    files = {json.loads(p.read_text())["elapsed_hours"]: json.loads(p.read_text())
             for p in (project.root / "logs" / "24h_test" / "metrics").glob("*.json")}
    for row in metrics:
        sample = files[float(row["elapsed_hours"])]
        assert float(row["memory_max_process_rss_mb"]) == sample["memory_max_process_rss_mb"]
        assert float(row["cpu_percent"]) == sample["cpu_percent"]
        for name, proc in sample["processes"].items():
            assert float(row[f"rss_mb_{name}"]) == proc["rss_mb"]
        for queue, pending in sample["queues"].items():
            assert int(row[f"queue_{queue}"]) == pending
    assert max(float(r["memory_max_process_rss_mb"]) for r in metrics) == value[
        "Memory Stability"]
