"""``trinity export --format csv``: stores populated through the project's own writers
(journal, runs, pattern store, cost ledger, alert log, metrics sampler, snapshot files),
exported, and every file read back against those stores; bad input gives one clear line.
The export of the session's compressed run, checked independently, is
tests/system/test_export.py."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.controller.reports._export import FILES, export_cli, query, read_csv
from trinity.agents.witness.embedding import load_embedder
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.clock import now_ms
from trinity.contract import Alert
from trinity.controller.ops import run as runner
from trinity.controller.process import snapshots
from trinity.controller.process.metrics import MetricsSampler
from trinity.controller.reports.export import (
    CALL_COLUMNS,
    EVENT_COLUMNS,
    METRIC_COLUMNS,
    OUTCOME_COLUMNS,
    export_run,
)
from trinity.settings import Settings
from trinity.stores import run_logs, runs
from trinity.stores import runs as records
from trinity.stores.costs import CallRecord, CostLedger
from trinity.stores.run_logs import AlertLog, read_alerts

SECRET_KEY = "sk-proj-abcdefghijklmnop0123456789"


@dataclass
class Recorded:
    settings: Settings
    run: runs.Run
    other: runs.Run


def _call(run_id: str, n: int, *, agent: str, status: str = "success", error: str | None = None,
          local: bool = True, cost: float = 0.0) -> CallRecord:
    return CallRecord(
        call_id=f"{run_id}-call-{n}", request_id=f"req-{n}", attempt=1, route="primary",
        ts_ms=now_ms(), sim_elapsed_s=100.0 * n, run_id=run_id, agent=agent,
        provider="embedded" if local else "cloud", provider_kind="embedded" if local else "openai",
        model="SmolLM2-135M-Instruct" if local else "gpt-5", local=local, input_tokens=100 + n,
        output_tokens=50 + n, cached_tokens=0, reasoning_tokens=0, tokens_estimated=not local,
        cost_usd=cost, latency_ms=12.5 * n, status=status, error_class=None if error is None
        else "http_error", error=error, event_id=f"{run_id}/c001", task_id=None)


def _emit(journal: Journal, run: runs.Run, cycle: int, noise: int, category: str) -> str:
    """An event as the controller journals it (its ground truth beside it)."""
    event_id = f"{run.run_id}/c{cycle:03d}" + (f"/n{noise}" if noise else "")
    with journal.transaction() as tx:
        tx.publish("telemetry_stream", json.dumps({"event_id": event_id}).encode(), key=event_id)
        tx.conn.execute(
            "INSERT INTO events(event_id, run_id, cycle, noise, category, emitted_ms,"
            " sim_elapsed_s) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, run.run_id, cycle, noise, category, now_ms() - 1500, (cycle - 1) * 1800.0))
    return event_id


def _outcome(journal: Journal, task_id: str, event_id: str, delegate: str, status: str) -> None:
    """An outcome as the agents record it (witness, architect and executor alike)."""
    with journal.transaction() as tx:
        tx.conn.execute(
            "INSERT INTO outcomes(task_id, event_id, run_id, delegate, status, recorded_ms,"
            " product) VALUES (?, ?, NULL, ?, ?, ?, '{}')",
            (task_id, event_id, delegate, status, now_ms()))


def _detect(store: PatternStore, event_id: str, run_id: str, pattern: str | None,
            confidence: float) -> None:
    vector = store.embedder.embed([event_id])[0]
    store.record(Detection(pattern=pattern, label=pattern or "none", confidence=confidence,
                           probabilities={}, neighbours=(), vector=vector, notes=()),
                 event_id=event_id, text=event_id, run_id=run_id, latency_ms=3.0)


def _metrics(settings: Settings, journal: Journal, run: runs.Run, count: int) -> None:
    """System metrics measured by the real sampler, written and recorded as the controller
    does (file first, then its row in the journal's snapshots table)."""
    sampler = MetricsSampler()
    for idx in range(count):
        at = idx * 300.0
        sample = sampler.sample({"controller": os.getpid()}, at, queues={
            "telemetry_stream": idx, "improvement_queue": 0, "execution_queue": 1, "alerts": 0},
            databases={p.name: p for p in (settings.messages_db, settings.patterns_db,
                                           settings.costs_db)})
        path = run_logs.snapshot_path(settings.log_dir, "metrics", at)
        run_logs.write_json(path, {**snapshots.header(run.run_id, at, at), **sample})
        with journal.transaction() as tx:
            tx.conn.execute("INSERT INTO snapshots(run_id, kind, idx, sim_elapsed_s, path,"
                            " written_ms) VALUES (?, 'metrics', ?, ?, ?, ?)",
                            (run.run_id, idx, at, str(path), now_ms()))


def _alert(log: AlertLog, kind: str, run_id: str | None, ts_ms: int | None = None) -> None:
    alert = Alert.of(kind, "warning", f"{kind} happened", agent="witness", pending=3).payload()
    if run_id is not None:
        alert["run_id"] = run_id
    if ts_ms is not None:
        alert["ts_ms"] = ts_ms
    log.write_alert(alert, source="controller")


@pytest.fixture
def recorded(short_dir: Path) -> Iterator[Recorded]:
    """An earlier, stopped run and a still-active latest run (3 cycles, 1 noise event each;
    the last cycle not classified yet), with outcomes, model calls, alerts and metrics."""
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})
    journal = Journal(settings.messages_db, source="test")
    store = PatternStore(settings.patterns_db, load_embedder())
    ledger = CostLedger(settings.costs_db)
    log = AlertLog(settings.log_dir / "alerts.log")
    try:
        config = {"time_scale": 1, "duration_h": 24, "event_interval_min": 30}
        other = runs.create_run(journal.conn, config)
        old_event = _emit(journal, other, 1, 0, "critical_error")
        _detect(store, old_event, other.run_id, "critical_error", 0.95)
        _outcome(journal, f"{old_event}/t1", old_event, "TestGenerator", "done")
        ledger.record(_call(other.run_id, 1, agent="architect"))
        _alert(log, "queue_backlog", other.run_id)
        _alert(log, "agent_crashed", None, ts_ms=other.started_ms)  # before this run began
        runs.finish(journal.conn, other.run_id, runs.STOPPED)
        time.sleep(0.005)

        run = runs.create_run(journal.conn, {**config, "noise_events": 1})
        runner.write_test_config(settings, run, short_dir / "supervisor.conf", resumed=False)
        c1, n1 = _emit(journal, run, 1, 0, "critical_error"), _emit(journal, run, 1, 1, "none")
        c2, n2 = _emit(journal, run, 2, 0, "duplication"), _emit(journal, run, 2, 1, "none")
        _emit(journal, run, 3, 0, "flaky_test")
        _emit(journal, run, 3, 1, "none")
        _detect(store, c1, run.run_id, "critical_error", 0.91)
        _detect(store, n1, run.run_id, None, 0.8)
        _detect(store, c2, run.run_id, "feature_request", 0.6)
        _detect(store, n2, run.run_id, None, 0.7)
        _outcome(journal, f"{c1}/t1", c1, "AgencyCodeAgent", "done")
        _outcome(journal, f"{c1}/t2", c1, "TestGenerator", "failed")
        _outcome(journal, f"{n1}/no_pattern", n1, "witness", "no_pattern")
        _outcome(journal, f"{c2}/plan", c2, "architect", "plan_failed")
        _outcome(journal, f"{n2}/no_pattern", n2, "witness", "no_pattern")
        ledger.record(_call(run.run_id, 1, agent="architect"))
        ledger.record(_call(run.run_id, 2, agent="executor", local=False, cost=0.0123))
        ledger.record(_call(run.run_id, 3, agent="executor", local=False, status="error",
                            error=f"401 Incorrect API key provided: {SECRET_KEY}"))
        _alert(log, "memory_growth", run.run_id)
        # from supervisord's listener: no run id, raised while this run was going
        _alert(log, "agent_crashed", None, ts_ms=run.started_ms)
        _metrics(settings, journal, run, 3)
        yield Recorded(settings, run, other)
    finally:
        ledger.close()
        store.close()
        journal.close()


def _ms(iso: str) -> int:
    assert iso.endswith("Z"), iso
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def test_every_table_is_exported_with_exact_rows(recorded: Recorded, tmp_path: Path) -> None:
    settings, run = recorded.settings, recorded.run
    out = tmp_path / "export"
    written = export_run(settings, settings.log_dir, None, out)
    assert written == {"events.csv": 6, "outcomes.csv": 5, "llm_calls.csv": 3,
                       "alerts.csv": 2, "metrics.csv": 3}
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temp file left
    for name, rows in written.items():
        assert len(read_csv(out / name)[1]) == rows

    header, events = read_csv(out / "events.csv")
    assert header == list(EVENT_COLUMNS)
    emitted = {e: (c, cyc, ms) for e, c, cyc, ms in query(
        settings.messages_db, "SELECT event_id, category, cycle, emitted_ms FROM events"
        " WHERE run_id=?", run.run_id)}
    detected = {e: (p, c, t) for e, p, c, t in query(
        settings.patterns_db, "SELECT event_id, pattern, confidence, detected_ms"
        " FROM detections WHERE run_id=?", run.run_id)}
    assert [r["event_id"] for r in events] == [
        f"{run.run_id}/c{c:03d}{suffix}" for c in (1, 2, 3) for suffix in ("", "/n1")]
    for row in events:
        category, cycle, emitted_ms = emitted[row["event_id"]]
        assert (row["event_type"], int(row["cycle"]), _ms(row["emitted_at"])) == (
            category, cycle, emitted_ms)
        if row["event_id"] not in detected:  # the run is still going: not classified yet
            assert row["detected_pattern"] == row["confidence"] == row["detected_at"] == ""
            assert row["detection_latency_ms"] == ""
            continue
        pattern, confidence, detected_ms = detected[row["event_id"]]
        assert row["detected_pattern"] == (pattern or "")
        assert float(row["confidence"]) == confidence
        assert int(row["detection_latency_ms"]) == detected_ms - emitted_ms >= 1500
        assert _ms(row["detected_at"]) == detected_ms
    by_id = {r["event_id"]: r for r in events}
    assert by_id[f"{run.run_id}/c001/n1"]["event_type"] == "none"
    assert by_id[f"{run.run_id}/c001/n1"]["detected_pattern"] == ""  # WITNESS abstained
    assert by_id[f"{run.run_id}/c002"]["detected_pattern"] == "feature_request"


def test_outcomes_one_row_each_and_abstentions_without_a_task(
        recorded: Recorded, tmp_path: Path) -> None:
    settings, run = recorded.settings, recorded.run
    export_run(settings, settings.log_dir, None, tmp_path)
    header, rows = read_csv(tmp_path / "outcomes.csv")
    assert header == list(OUTCOME_COLUMNS)
    stored = {t: (e, d, s, ms) for t, e, d, s, ms in query(
        settings.messages_db, "SELECT task_id, event_id, delegate, status, recorded_ms"
        " FROM outcomes")}
    assert len(stored) == 6  # the earlier run's outcome is not this run's
    abstained = [r for r in rows if r["status"] == "no_pattern"]
    assert [(r["event_id"], r["task_id"], r["delegate"]) for r in abstained] == [
        (f"{run.run_id}/c001/n1", "", "witness"), (f"{run.run_id}/c002/n1", "", "witness")]
    for row in rows:
        task_id = row["task_id"] or f"{row['event_id']}/no_pattern"
        assert stored[task_id] == (row["event_id"], row["delegate"], row["status"],
                                   _ms(row["recorded_at"]))
    assert Counter(r["status"] for r in rows) == {"done": 1, "failed": 1, "plan_failed": 1,
                                                  "no_pattern": 2}


def test_llm_calls_are_the_ledger_rows_of_the_run_without_secrets(
        recorded: Recorded, tmp_path: Path) -> None:
    settings, run = recorded.settings, recorded.run
    export_run(settings, settings.log_dir, run.run_id, tmp_path)
    header, rows = read_csv(tmp_path / "llm_calls.csv")
    assert header == list(CALL_COLUMNS)
    ledger = CostLedger(settings.costs_db)
    try:
        expected = ledger.calls(run.run_id)
        totals = ledger.totals(run.run_id)
    finally:
        ledger.close()
    assert [r["call_id"] for r in rows] == [c["call_id"] for c in expected]
    for row, call in zip(rows, expected, strict=True):
        assert _ms(row["ts"]) == call["ts_ms"]
        assert row["local"] == ("true" if call["local"] else "false")
        assert float(row["cost_usd"]) == call["cost_usd"]
        assert float(row["latency_ms"]) == call["latency_ms"]
        assert int(row["input_tokens"]) == call["input_tokens"]
        assert row["task_id"] == "" and call["task_id"] is None
    assert sum(float(r["cost_usd"]) for r in rows) == pytest.approx(totals["total_cost_usd"])
    text = (tmp_path / "llm_calls.csv").read_text()
    assert SECRET_KEY not in text
    assert "401 Incorrect API key provided: sk-[redacted]" in text


def test_alerts_are_the_runs_by_the_criteria_rule(recorded: Recorded, tmp_path: Path) -> None:
    settings, run = recorded.settings, recorded.run
    export_run(settings, settings.log_dir, None, tmp_path)
    _, rows = read_csv(tmp_path / "alerts.csv")
    assert [(r["kind"], r["run_id"]) for r in rows] == [("memory_growth", run.run_id),
                                                        ("agent_crashed", "")]
    logged = {a["alert_id"]: a for a in read_alerts(settings.log_dir / "alerts.log")}
    assert len(logged) == 4
    for row in rows:
        alert = logged[row["alert_id"]]
        assert _ms(row["ts"]) == alert["ts_ms"]
        assert (row["severity"], row["agent"], row["source"], row["message"]) == (
            "warning", "witness", "controller", alert["message"])
        assert json.loads(row["details"]) == {"pending": 3}

    # The earlier run's alerts: its tagged one, and the crash alert raised while it ran.
    logs = settings.log_dir
    (logs / "test_config.json").write_text(json.dumps({"run_id": recorded.other.run_id}))
    assert export_run(settings, logs, recorded.other.run_id, tmp_path / "other") == {
        "events.csv": 1, "outcomes.csv": 1, "llm_calls.csv": 1, "alerts.csv": 2,
        "metrics.csv": 0}
    _, rows = read_csv(tmp_path / "other" / "alerts.csv")
    assert sorted(r["kind"] for r in rows) == ["agent_crashed", "queue_backlog"]


def test_metrics_flatten_each_sample_in_a_stable_column_order(
        recorded: Recorded, tmp_path: Path) -> None:
    settings = recorded.settings
    export_run(settings, settings.log_dir, None, tmp_path)
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == [*METRIC_COLUMNS, "rss_mb_controller", "queue_telemetry_stream",
                      "queue_improvement_queue", "queue_execution_queue", "queue_alerts",
                      "db_mb_trinity_messages.db", "db_mb_trinity_patterns.db",
                      "db_mb_trinity_costs.db"]
    files = sorted((settings.log_dir / "metrics").glob("system_metrics_*.json"))
    assert len(files) == len(rows) == 3
    for row, path in zip(rows, files, strict=True):
        sample = json.loads(path.read_text())
        assert float(row["elapsed_hours"]) == sample["elapsed_hours"]
        assert _ms(row["timestamp"]) == _ms(sample["timestamp"])
        assert float(row["memory_mb"]) == sample["memory_mb"]
        assert float(row["memory_max_process_rss_mb"]) == sample["memory_max_process_rss_mb"]
        assert float(row["rss_mb_controller"]) == sample["processes"]["controller"]["rss_mb"] > 0
        assert int(row["queue_telemetry_stream"]) == sample["queues"]["telemetry_stream"]
        assert float(row["db_mb_trinity_messages.db"]) == (
            sample["databases_mb"]["trinity_messages.db"])
        assert row["memory_growth_pct_per_hour"] == ""  # None before two warm hours
    assert [r["queue_telemetry_stream"] for r in rows] == ["0", "1", "2"]


def test_cli_prints_one_line_per_file_and_rewrites_in_place(
        recorded: Recorded, tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"
    for _ in range(2):
        result = export_cli(recorded.settings, "--format", "csv", "--output", str(out))
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            f"{out / name}: {rows} rows" for name, rows in zip(FILES, (6, 5, 3, 2, 3),
                                                               strict=True)]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert oct((out / "events.csv").stat().st_mode & 0o777) == oct(0o644)


def _corrupt(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 100)


def _damage(recorded: Recorded, what: str) -> list[str]:
    """Break one input; returns the CLI arguments that then must fail."""
    s = recorded.settings
    metrics_file = s.log_dir / "metrics" / "system_metrics_000500.json"
    damage = {
        "empty log dir": lambda: (s.data_dir / "empty").mkdir(),
        "no test_config.json": lambda: (s.log_dir / "test_config.json").unlink(),
        "torn test_config.json": lambda: (s.log_dir / "test_config.json").write_text(
            '{"run_id": "2026'),
        "torn metrics file": lambda: metrics_file.write_text('{"timestamp": '),
        "metrics file missing": metrics_file.unlink,
        **{f"missing {db}": getattr(s, db).unlink for db in DATABASES},
        **{f"corrupt {db}": lambda db=db: _corrupt(getattr(s, db)) for db in DATABASES},
    }
    damage.get(what, lambda: None)()
    extra = {
        "missing log dir": ["--input", str(s.data_dir / "nowhere")],
        "empty log dir": ["--input", str(s.data_dir / "empty")],
        "another run's logs": ["--run", recorded.other.run_id],
        "unknown run": ["--run", "19990101-000000-dead"],
    }.get(what, [])
    return ["--format", "xlsx" if what == "unsupported format" else "csv", *extra]


DATABASES = ("messages_db", "patterns_db", "costs_db")
BAD_INPUT = {
    "missing log dir": "no log folder at",
    "empty log dir": "is empty",
    "no test_config.json": "has no test_config.json",
    "torn test_config.json": "test_config.json is unreadable",
    "torn metrics file": "system_metrics_000500.json is unreadable",
    "metrics file missing": "1 metrics snapshots the journal records as written are missing",
    "another run's logs": "holds the logs of run",
    "unknown run": "no run '19990101-000000-dead' in the journal; the latest runs:",
    "unsupported format": "'xlsx' is not 'csv'",
    "missing messages_db": "no trinity_messages.db in",
    "missing patterns_db": "no trinity_patterns.db in",
    "missing costs_db": "no trinity_costs.db in",
    "corrupt messages_db": "trinity_messages.db: file is not a database",
    "corrupt patterns_db": "trinity_patterns.db: file is not a database",
    "corrupt costs_db": "trinity_costs.db: file is not a database",
}


@pytest.mark.parametrize("what", list(BAD_INPUT))
def test_bad_input_is_one_clear_error_and_writes_nothing(
        recorded: Recorded, tmp_path: Path, what: str) -> None:
    out = tmp_path / "out"
    result = export_cli(recorded.settings, *_damage(recorded, what), "--output", str(out))
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert BAD_INPUT[what] in result.output, result.output
    assert not out.exists() or not any(out.iterdir())


def test_no_run_recorded_yet(short_dir: Path, tmp_path: Path) -> None:
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})
    journal = Journal(settings.messages_db, source="test")
    records.ensure_schema(journal.conn)
    journal.close()
    result = export_cli(settings, "--format", "csv", "--output", str(tmp_path))
    assert result.exit_code == 1
    assert "no run recorded in the journal yet" in result.output
