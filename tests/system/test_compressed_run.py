"""Acceptance of the test plan's run, compressed: one run with the kill -9 of every process
and ``--resume`` half-way (the session's shared ``compressed_run``: 8 simulated hours, the
restart at hour 4; ``make demo`` and ``make bench-24h`` run the whole 24 hours with the
hour-12 restart in CI), then every file, count and shape the plan asks for, read back from
disk. Each count follows from the run's own duration and intervals."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import EXTERNAL_EVENTS, CompressedRun, assert_each_event_done_once
from trinity.contract import PATTERNS as CATEGORIES
from trinity.controller.ops.audit import audit_run
from trinity.settings import Settings
from trinity.stores.run_logs import read_alerts


def _load_all(folder: Path, pattern: str) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob(pattern))}


@pytest.mark.timeout(600)
def test_compressed_run_passes_with_the_restart_half_way(compressed_run: CompressedRun) -> None:
    result = compressed_run.result
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "persistence: OK" in out
    assert "mandatory criteria: all passed" in out
    assert f"{compressed_run.events} events over {compressed_run.hours:.1f} simulated hours" \
        in out


@pytest.mark.timeout(600)
def test_snapshot_files_counts_and_shapes(compressed_run: CompressedRun) -> None:
    hours = compressed_run.hours
    logs = compressed_run.log_dir
    costs = _load_all(logs / "costs", "cost_snapshot_*.json")
    patterns = _load_all(logs / "patterns", "pattern_stats_*.json")
    metrics = _load_all(logs / "metrics", "system_metrics_*.json")
    # One cost and one pattern snapshot at the start of each hour, a metrics sample every
    # 5 simulated minutes.
    assert compressed_run.snapshots == hours
    assert sorted(costs) == [f"cost_snapshot_{h:02d}0000.json" for h in range(hours)]
    assert sorted(patterns) == [f"pattern_stats_{h:02d}0000.json" for h in range(hours)]
    assert sorted(metrics) == sorted(f"system_metrics_{m // 60:02d}{m % 60:02d}00.json"
                                     for m in range(0, hours * 60, 5))
    assert len(metrics) == compressed_run.metrics_samples == hours * 12
    for name, snap in costs.items():
        assert {"timestamp", "elapsed_hours", "summary"} <= snap.keys(), name
        summary = snap["summary"]
        assert set(summary["by_agent"]) == {"WITNESS", "ARCHITECT", "EXECUTOR"}
        assert summary["by_agent"]["WITNESS"] == 0.0
        assert isinstance(summary["total_calls"], int)
    hour = [costs[f"cost_snapshot_{h:02d}0000.json"]["summary"]["total_calls"]
            for h in range(hours)]
    assert hour == sorted(hour) and hour[-1] > 0  # the ledger only grows, restart included
    for name, snap in patterns.items():
        assert set(snap["detections"]["by_type"]) == set(CATEGORIES), name
        assert {"total_patterns", "new_patterns_this_hour", "confidence_trend"} <= set(
            snap["learning"])
    last_patterns = patterns[f"pattern_stats_{hours - 1:02d}0000.json"]
    assert last_patterns["detections"]["total"] > 0
    assert "memory_growth_pct_per_hour" in last_patterns
    for name, sample in metrics.items():
        assert {"timestamp", "cpu_percent", "memory_mb", "disk_read_mb", "disk_write_mb",
                "queues"} <= sample.keys(), name
        assert {"telemetry_stream", "improvement_queue", "execution_queue"} <= set(
            sample["queues"])
    late = [s for s in metrics.values() if s["elapsed_hours"] >= 2]
    assert len(late) >= 12  # the run outlasts the growth rule's first two hours
    assert all(s["memory_growth_pct_per_hour"] is not None for s in late[-12:])
    assert max(s["memory_max_process_rss_mb"] for s in metrics.values()) < 500
    assert all(s["processes"] for s in metrics.values())


@pytest.mark.timeout(600)
def test_every_event_has_its_outcome_once_and_cycles_continue_after_the_restart(
        compressed_run: CompressedRun) -> None:
    assert_each_event_done_once(compressed_run.project, compressed_run.events)
    logs = compressed_run.log_dir
    before = json.loads((logs / "persistence_before.json").read_text())
    after = json.loads((logs / "persistence_after.json").read_text())
    assert after["problems"] == []
    # The kill came at the restart hour: cycle 2h + 1 is emitted at hour h (one every 30
    # minutes), give or take the events of two simulated hours.
    restart_cycle = compressed_run.restart_at_h * 60 // compressed_run.event_interval_min
    assert restart_cycle - 4 <= before["last_cycle"] <= restart_cycle + 2
    assert after["state"]["patterns"]["exemplars"] >= before["patterns"]["exemplars"]
    assert after["state"]["costs"]["calls"] >= before["costs"]["calls"]
    # Alerts come from measured conditions only: this healthy run has none but the
    # record of its deliberate restart.
    alerts = read_alerts(logs / "alerts.log")
    assert [a["kind"] for a in alerts] == ["deliberate_restart"], alerts
    config = json.loads((logs / "test_config.json").read_text())
    assert len(config["resumed_ms"]) == 1
    assert config["run"]["duration_h"] == compressed_run.hours
    lines = (logs / "trinity.log").read_text().splitlines()
    processes = {json.loads(line)["process"] for line in lines}
    assert {"controller", "witness", "architect", "executor"} <= processes


@pytest.mark.timeout(600)
def test_events_sent_during_the_run_belong_to_it(compressed_run: CompressedRun) -> None:
    """The events a user sent with ``trinity emit`` while the run went on (the fixture's
    EXTERNAL_EVENTS) are the run's: detected, planned, paid and answered under its id,
    shown by ``trinity status`` and followed by the audit, apart from the plan's counts."""
    project = compressed_run.project
    ids = [e["event_id"] for e in EXTERNAL_EVENTS]
    status = project.trinity("status", "--json")
    assert status.returncode == 0, status.stderr
    run = json.loads(status.stdout)["run"]
    assert (run["external"], run["external_completed"]) == (len(ids), len(ids))
    assert run["emitted"] == compressed_run.events  # the plan's own count is unchanged
    text = project.trinity("status").stdout
    assert f"external events (trinity emit): {len(ids)}/{len(ids)} with outcome" in text
    patterns = sqlite3.connect(project.root / "trinity_patterns.db")
    try:
        detected = dict(patterns.execute(
            f"SELECT event_id, run_id FROM detections WHERE event_id IN ({_marks(ids)})", ids))
    finally:
        patterns.close()
    assert detected == {e: run["run_id"] for e in ids}
    ledger = sqlite3.connect(project.root / "trinity_costs.db")
    try:
        paid = {r for (r,) in ledger.execute(
            f"SELECT DISTINCT run_id FROM calls WHERE event_id IN ({_marks(ids)})", ids)}
    finally:
        ledger.close()
    assert paid <= {run["run_id"]}  # any model call they caused is the run's
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(project.root)})
    found = audit_run(settings, run["run_id"])
    assert found.passed, "\n".join(found.lines())
    assert found.external_events == len(ids)


def _marks(items: list[str]) -> str:
    return ",".join("?" * len(items))
