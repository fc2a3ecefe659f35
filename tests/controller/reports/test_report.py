"""``trinity report``: numbers recomputed independently from the stores and snapshot files,
charts that are real PNGs drawn from the run's data, FAILED reports naming the failed
criterion, and one-line errors for bad input.

These tests build a small run through the project's own writers (Journal and runs,
CostLedger, run_logs.write_json with cost_snapshot/pattern_stats, AlertLog); the reports
of the session's compressed run and of a real run with a killed agent are
tests/system/test_report.py.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from matplotlib.image import imread

from tests.controller.reports._report import (
    check_report_against_records,
    invoke,
)
from trinity import measures
from trinity.bus.journal import Journal
from trinity.clock import now_ms
from trinity.contract import NONE as NOISE
from trinity.contract import PATTERNS as CATEGORIES
from trinity.contract import Alert
from trinity.controller.process import snapshots
from trinity.controller.reports import criteria, report
from trinity.db import open_readonly
from trinity.settings import Settings
from trinity.stores import patterns as pattern_store
from trinity.stores import run_logs, runs
from trinity.stores.costs import CallRecord, CostLedger, summarize
from trinity.stores.run_logs import AlertLog

CYCLES = 10  # five simulated hours at one event per 30 minutes
FAILED_REASON = "both model attempts cut at max_tokens"


# -- a small run written through the project's own writers ------------------------------

@dataclass
class Plan:
    """What the small run records; the defaults pass every mandatory criterion."""

    abstain_cycles: tuple[int, ...] = (3,)       # a feature_request event given no pattern
    wrong_cycles: tuple[int, ...] = (8,)         # a feature_request event called duplication
    crash: bool = False
    peak_rss_mb: float = 310.0
    alert_message: str = "queue improvement_queue has 51 pending messages (limit 50)"


def _call(run_id: str, n: int, agent: str, sim: float, *, local: bool, cost: float,
          event_id: str, task_id: str | None = None) -> CallRecord:
    return CallRecord(
        call_id=f"call-{n}", request_id=f"req-{n}", attempt=1, route="primary",
        ts_ms=now_ms() + n, sim_elapsed_s=sim, run_id=run_id, agent=agent,
        provider="local" if local else "cloud", provider_kind="embedded" if local else "openai",
        model="qwen-local" if local else "gpt-5", local=local, input_tokens=100 + n,
        output_tokens=40, cached_tokens=0, reasoning_tokens=0, tokens_estimated=False,
        cost_usd=cost, latency_ms=900.0, status="success", error_class=None, error=None,
        event_id=event_id, task_id=task_id)


def _detect(store: sqlite3.Connection, run_id: str, event_id: str, pattern: str | None,
            label: str, confidence: float, detected_ms: int) -> None:
    store.execute("INSERT INTO detections VALUES (?, ?, 's1', ?, ?, ?, ?, NULL, NULL, 0, ?, NULL)",
                  (event_id, run_id, pattern, label, confidence, detected_ms, 4.0))
    if pattern is not None:
        store.execute("INSERT INTO exemplars(label, text, source, event_id, session_id,"
                      " created_ms, vector) VALUES (?, 't', 'detected', ?, 's1', 0, x'00')",
                      (pattern, event_id))


def _metrics_sample(run_id: str, sim: float, rss_mb: float) -> dict[str, Any]:
    return {**snapshots.header(run_id, sim, sim), "cpu_percent": 5.0, "memory_mb": rss_mb * 2,
            "memory_max_process_rss_mb": rss_mb, "memory_growth_pct_per_hour": 0.5,
            "queues": {"telemetry_stream": 0, "improvement_queue": int(sim // 3600)},
            "processes": {"witness": {"pid": 1, "rss_mb": rss_mb}}}


def build_run(settings: Settings, plan: Plan) -> runs.Run:  # noqa: C901 - one story, in order
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {
        "time_scale": 1, "duration_h": CYCLES / 2, "event_interval_min": 30, "budget_usd": 1.0,
        "noise_events": 1, "data_dir": str(settings.data_dir)})
    settings.log_dir.mkdir(parents=True)
    (settings.log_dir / "test_config.json").write_text(json.dumps({"run_id": run.run_id}))
    store = sqlite3.connect(settings.patterns_db)
    pattern_store.ensure_schema(store)
    ledger = CostLedger(settings.costs_db)
    alerts = AlertLog(settings.log_dir / "alerts.log")
    calls: list[dict[str, Any]] = []
    t0 = now_ms()
    for cycle in range(1, CYCLES + 1):
        sim = (cycle - 1) * 1800.0
        if sim % 3600 == 0:  # the hourly snapshots, then the 30-minute metrics sample
            run_logs.write_json(run_logs.snapshot_path(settings.log_dir, "costs", sim), {
                **snapshots.header(run.run_id, sim, sim),
                **snapshots.cost_snapshot(summarize(calls), sum(
                    c["cost_usd"] for c in calls if c["sim_elapsed_s"] > sim - 3600), 1.0)})
            store.commit()
            conn = open_readonly(settings.patterns_db)
            try:
                stats = measures.pattern_stats(journal.conn, conn, run.run_id, sim, 3600.0)
            finally:
                conn.close()
            run_logs.write_json(run_logs.snapshot_path(settings.log_dir, "patterns", sim),
                                 {**snapshots.header(run.run_id, sim, sim), **stats})
        rss = plan.peak_rss_mb if cycle == 6 else 250.0 + cycle
        run_logs.write_json(run_logs.snapshot_path(settings.log_dir, "metrics", sim),
                             _metrics_sample(run.run_id, sim, rss))
        truth = CATEGORIES[(cycle - 1) % len(CATEGORIES)]
        for noise, category in ((0, truth), (1, NOISE)):
            event_id = f"{run.run_id}/c{cycle:03d}" + (f"/n{noise}" if noise else "")
            emitted = t0 + cycle * 10_000
            with journal.transaction() as tx:
                tx.conn.execute(
                    "INSERT INTO events(event_id, run_id, cycle, noise, category, emitted_ms,"
                    " sim_elapsed_s) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (event_id, run.run_id, cycle, noise, category, emitted, sim))
            latency_ms = 150 * cycle + 37 * noise  # mean 0.8435 s: no rounding tie
            if noise:
                pattern = "flaky_test" if cycle == 2 else None
                _detect(store, run.run_id, event_id, pattern, pattern or NOISE, 0.66,
                        emitted + latency_ms)
                delegate = "witness"
            elif cycle in plan.abstain_cycles:
                _detect(store, run.run_id, event_id, None, truth, 0.41, emitted + latency_ms)
                delegate = "witness"
            else:
                pattern = "duplication" if cycle in plan.wrong_cycles else truth
                _detect(store, run.run_id, event_id, pattern, pattern, 0.70 + cycle / 50,
                        emitted + latency_ms)
                delegate = "QualityEnforcer"
            task_id = f"task-{cycle}-{noise}"
            failed = cycle == 7 and delegate != "witness"  # both attempts cut short
            with journal.transaction() as tx:
                tx.conn.execute(
                    "INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                    " recorded_ms, product) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (task_id, event_id, run.run_id, delegate, "failed" if failed else "done",
                     now_ms(), json.dumps({"error": FAILED_REASON}) if failed else None))
            if delegate != "witness":
                for n, agent, local, cost in ((2 * cycle, "architect", True, 0.0),
                                              (2 * cycle + 1, "executor", cycle % 2 == 0, 0.02)):
                    record = _call(run.run_id, n, agent, sim + 60, local=local,
                                   cost=0.0 if local else cost, event_id=event_id,
                                   task_id=task_id if agent == "executor" else None)
                    ledger.record(record)
                    calls.append(asdict(record))
        if cycle == 4:
            alert = Alert.of("queue_backlog", "warning", plan.alert_message,
                               alert_id=f"backlog/{run.run_id}").payload()
            alerts.write_alert({**alert, "run_id": run.run_id, "sim_elapsed_s": sim},
                               source="controller")
        if cycle == 5 and plan.crash:
            crash = Alert.of("agent_crashed", "critical",
                             "witness exited unexpectedly (pid 4242, from RUNNING)",
                             agent="witness", pid="4242")
            alerts.write_alert(crash.payload(), source="crashwatch")
    # An event `trinity emit` journaled during the run, classified and answered.
    with journal.transaction() as tx:
        tx.conn.execute("INSERT INTO emitted_events(event_id, msg_id, emitted_ms, run_id,"
                        " sim_elapsed_s) VALUES ('ci/ext-1', 'm', ?, ?, 9000.0)",
                        (t0, run.run_id))
        tx.conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                        " recorded_ms) VALUES ('ci/ext-1/t1', 'ci/ext-1', ?, "
                        "'QualityEnforcer', 'done', ?)", (run.run_id, now_ms()))
    _detect(store, run.run_id, "ci/ext-1", "critical_error", "critical_error", 0.9, t0 + 500)
    for n, agent in ((100, "architect"), (101, "executor")):
        ledger.record(_call(run.run_id, n, agent, 9060.0, local=True, cost=0.0,
                            event_id="ci/ext-1",
                            task_id="ci/ext-1/t1" if agent == "executor" else None))
    with journal.transaction() as tx:
        for cycle in range(1, CYCLES + 1):
            tx.conn.execute("INSERT INTO snapshots VALUES (?, 'metrics', ?, ?, 'p', 0)",
                            (run.run_id, cycle - 1, (cycle - 1) * 1800.0))
    store.commit()
    store.close()
    ledger.close()
    runs.checkpoint(journal.conn, run.run_id, CYCLES * 1800.0)
    runs.finish(journal.conn, run.run_id, runs.COMPLETED)
    journal.close()
    criteria.save_after(settings, [], {"run_id": run.run_id})
    return run


@pytest.fixture
def settings(short_dir: Path) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})


# -- numbers, status, content -----------------------------------------------------------

def test_report_numbers_match_the_records_recomputed_independently(
        settings: Settings, tmp_path: Path) -> None:
    run = build_run(settings, Plan())
    text = check_report_against_records(settings.data_dir, settings.log_dir, tmp_path)
    # The plan is known: 20 events (10 + 10 noise), 3 of them wrong: c003 abstained,
    # c008 called duplication, the noise event of c002 called flaky_test.
    assert "Detection accuracy: 85.0% (17 of 20 classified events correct" in text
    assert "Status: PASSED ✓" in text
    assert "| ✓ PASS | Zero Crashes | 0 unexpected exits |" in text
    assert "| feature_request | 2 | 2 | 0 | 0.0% | - |" in text
    assert "| none | 10 | 10 | 9 | 90.0% | - |" in text
    # the failed task is counted and named with its reason; the external event is shown
    # and counted apart from the plan's events
    assert "Outcomes: 1 failed, 20 done" in text
    assert (f"| task-7-0 | {run.run_id}/c007 | QUALITYENFORCER | failed | "
            f"{FAILED_REASON} |") in text
    assert ("External events (trinity emit, no ground truth): 1 arrived during the run, "
            "1 classified (1 given a pattern), 1 with an outcome") in text
    assert "| ci/ext-1 | 2.50 | critical_error | 0.900 | done |" in text


def test_a_crash_fails_the_report_and_names_the_criterion(settings: Settings,
                                                          tmp_path: Path) -> None:
    build_run(settings, Plan(crash=True))
    result = invoke(settings.data_dir, "--output", str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output
    assert "FAILED (failed: Zero Crashes)" in result.output
    text = (tmp_path / "r.md").read_text()
    assert "Status: FAILED ✗ (failed: Zero Crashes)" in text
    assert "| ✗ FAIL | Zero Crashes | 1 unexpected exits | 0 unexpected exits |" in text
    assert "critical agent_crashed [witness]: witness exited unexpectedly" in text
    assert "Investigate the unexpected exits (witness x1; supervisord gave up 0 times)" in text
    assert "Not ready for continuous operation" in text
    html = (tmp_path / "r.html").read_text()
    assert "Status: FAILED ✗ (failed: Zero Crashes)" in html


def test_memory_above_the_limit_fails_and_is_an_incident(settings: Settings,
                                                         tmp_path: Path) -> None:
    build_run(settings, Plan(peak_rss_mb=612.0))
    result = invoke(settings.data_dir, "--output", str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "Status: FAILED ✗ (failed: Memory Stability)" in text
    assert "memory peak 612 MB RSS in witness at hour 2.50 (122% of the 500 MB limit)" in text
    assert "Investigate the memory peak of 612 MB in witness at hour 2.50" in text


def test_recommendations_follow_the_measurements(settings: Settings, tmp_path: Path) -> None:
    build_run(settings, Plan())
    data = report.build_report_data(settings, settings.log_dir)
    found = report.recommendations(data)
    # feature_request: c003 abstained with feature_request closest, c008 called duplication
    assert ("Improve feature_request detection: 0 of 2 correct; given instead: "
            "no pattern x1, duplication x1.") in found[0]
    assert found[1].startswith("Cut false positives: 1 of 10 noise events were given a "
                               "pattern (flaky_test x1)")
    # 9 plan events and the external one with model calls: 10 architect calls local,
    # 6 of 10 executor calls local
    assert data.criterion("Cost Efficiency").value == pytest.approx(16 / 20)
    assert not any("local model usage" in r for r in found)  # 80 % > 70 %: no rule fired
    assert not any("latency" in r for r in found)  # every latency < 2 s


def test_a_clean_run_gets_no_invented_advice(settings: Settings) -> None:
    build_run(settings, Plan(abstain_cycles=(), wrong_cycles=()))
    data = report.build_report_data(settings, settings.log_dir)
    found = report.recommendations(data)
    # only the measured noise false positive (c002) remains
    assert len(found) == 1 and found[0].startswith("Cut false positives: 1 of 10")


def test_threshold_advice_when_every_miss_was_an_abstention(settings: Settings) -> None:
    build_run(settings, Plan(abstain_cycles=(3, 8), wrong_cycles=()))
    found = report.recommendations(report.build_report_data(settings, settings.log_dir))
    assert found[0] == ("Lower the feature_request threshold: 0 of 2 correct; every miss was "
                        "an abstention with feature_request as the closest label (confidence "
                        "0.41-0.41).")


def test_html_is_self_contained_escaped_and_carries_the_same_content(
        settings: Settings, tmp_path: Path) -> None:
    build_run(settings, Plan(alert_message="<script>alert('x')</script> | a&b"))
    result = invoke(settings.data_dir, "--output", str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; | a&amp;b" in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)  # nothing fetched
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    for key, encoded in zip(report.CHART_KEYS, images, strict=True):
        assert base64.b64decode(encoded) == (tmp_path / f"r_{key}.png").read_bytes()
    markdown = (tmp_path / "r.md").read_text()
    assert r"\<script>alert('x')\</script> \| a&b" in markdown
    # the same sections and figures in both
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        assert f">{heading.replace('&', '&amp;')}</h" in page
    accuracy = re.search(r"Detection accuracy: ([^\n]+)", markdown)
    assert accuracy is not None and accuracy.group(1).replace("'", "&#x27;") in page


def test_default_output_is_dated_by_the_run_start_and_paths_are_printed(
        settings: Settings) -> None:
    run = build_run(settings, Plan())
    result = invoke(settings.data_dir)
    assert result.exit_code == 0, result.output
    day = time.strftime("%Y%m%d", time.gmtime(run.started_ms / 1000))
    md = settings.data_dir / "reports" / f"24h_test_{day}.md"
    written = [line.removeprefix("wrote ") for line in result.output.splitlines()[1:]]
    assert written == [str(md), str(md.with_suffix(".html"))] + [
        str(md.parent / f"24h_test_{day}_{key}.png") for key in report.CHART_KEYS]
    assert all(Path(p).stat().st_size > 0 for p in written)


def test_percentile_is_nearest_rank() -> None:
    values = [0.5, 0.1, 0.9, 0.3]
    for pct in (1, 25, 50, 75, 95, 100):
        assert measures.percentile(values, pct) == np.percentile(values, pct,
                                                               method="inverted_cdf")
    assert measures.percentile([], 95) is None


# -- bad input: one clear line, never a traceback -----------------------------------------

def _fails_cleanly(result: Result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_log_directory(settings: Settings) -> None:
    build_run(settings, Plan())
    _fails_cleanly(invoke(settings.data_dir, "--input", str(settings.data_dir / "nope")),
                   "does not exist")


def test_empty_log_directory(settings: Settings) -> None:
    build_run(settings, Plan())
    empty = settings.data_dir / "empty"
    empty.mkdir()
    _fails_cleanly(invoke(settings.data_dir, "--input", str(empty)), "holds no run logs")


def test_partly_written_log_directory_is_reported_with_its_gaps(settings: Settings,
                                                               tmp_path: Path) -> None:
    build_run(settings, Plan())
    metrics = sorted((settings.log_dir / "metrics").glob("*.json"))
    torn = metrics[3]
    torn.write_text(torn.read_text()[:40])  # a file cut off mid-write
    metrics[4].unlink()
    for path in (settings.log_dir / "patterns").glob("*.json"):
        path.unlink()
    result = invoke(settings.data_dir, "--output", str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "## Data gaps" in text
    assert f"metrics/{torn.name}: unreadable (torn, empty or not a snapshot)" in text
    assert "metrics: 8 of the 10 snapshot files the journal records as written" in text
    assert "![Detection accuracy over time (no pattern_stats snapshot with a classified " \
           "event)](r_accuracy.png)" in text
    assert imread(tmp_path / "r_accuracy.png").shape[0] > 100


def test_a_torn_test_config_alone_still_reports_the_latest_run(settings: Settings,
                                                               tmp_path: Path) -> None:
    run = build_run(settings, Plan())
    (settings.log_dir / "test_config.json").write_text('{"run_id": "2')
    result = invoke(settings.data_dir, "--output", str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output
    assert f"run {run.run_id}: PASSED" in result.output
    assert "test_config.json: unreadable" in (tmp_path / "r.md").read_text()


def test_an_archived_run_with_a_torn_test_config_is_reported_as_its_folder_names_it(
        settings: Settings, tmp_path: Path) -> None:
    """logs/archive/<run_id> is that run's, even when its test config is torn and a later
    run is the latest."""
    run = build_run(settings, Plan())
    archived = run_logs.archive(settings.log_dir)
    assert archived is not None and archived.name == run.run_id
    (archived / "test_config.json").write_text('{"run_id": "2')
    journal = Journal(settings.messages_db, source="test")
    try:
        later = runs.create_run(journal.conn, {"duration_h": 2.0})
    finally:
        journal.close()
    assert later.run_id != run.run_id
    result = invoke(settings.data_dir, "--input", str(archived), "--output",
                    str(tmp_path / "r.md"))
    assert result.exit_code == 0, result.output
    assert f"run {run.run_id}: PASSED" in result.output


def test_unknown_run_id(settings: Settings) -> None:
    run = build_run(settings, Plan())
    (settings.log_dir / "test_config.json").unlink()
    _fails_cleanly(invoke(settings.data_dir, "--run", "20990101-000000-dead"),
                   f"no run 20990101-000000-dead in {settings.messages_db} (latest runs: "
                   f"{run.run_id})")


def test_log_directory_of_another_run(settings: Settings) -> None:
    run = build_run(settings, Plan())
    _fails_cleanly(invoke(settings.data_dir, "--run", "20990101-000000-dead"),
                   f"holds the logs of run {run.run_id}, not 20990101-000000-dead")


def test_missing_journal(settings: Settings) -> None:
    build_run(settings, Plan())
    elsewhere = settings.data_dir / "other"
    elsewhere.mkdir()
    _fails_cleanly(invoke(elsewhere, "--input", str(settings.log_dir)),
                   f"no journal at {elsewhere / 'trinity_messages.db'}")


def test_corrupt_journal(settings: Settings) -> None:
    build_run(settings, Plan())
    for suffix in ("-wal", "-shm"):
        Path(f"{settings.messages_db}{suffix}").unlink(missing_ok=True)
    settings.messages_db.write_bytes(b"this is not a database" * 100)
    _fails_cleanly(invoke(settings.data_dir), f"cannot read {settings.messages_db}")


def test_corrupt_cost_ledger(settings: Settings) -> None:
    build_run(settings, Plan())
    for suffix in ("-wal", "-shm"):
        Path(f"{settings.costs_db}{suffix}").unlink(missing_ok=True)
    settings.costs_db.write_bytes(b"\0garbage" * 512)
    result = invoke(settings.data_dir)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "trinity_costs.db" in result.output and "not a database" in result.output


def test_output_that_is_a_directory(settings: Settings, tmp_path: Path) -> None:
    build_run(settings, Plan())
    result = invoke(settings.data_dir, "--output", str(tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output  # click's usage error
    assert f"Invalid value for '--output': File '{tmp_path}' is a directory" in result.output
