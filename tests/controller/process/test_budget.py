"""Budget alerts: 50/75/90 % and exceeded, each exactly once per run, from ledger totals.

The controller runs in process on a real journal and a real cost ledger; spending is
written as ledger rows, the way the router writes them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from trinity.bus.journal import Journal
from trinity.clock import ManualClock
from trinity.contract import ALERTS
from trinity.controller.process.controller import Controller
from trinity.plan import BUDGET_THRESHOLDS_PCT
from trinity.settings import Settings
from trinity.stores import runs
from trinity.stores.costs import CallRecord, CostLedger, crossed_thresholds


def _spend(ledger: CostLedger, run_id: str, usd: float, *, status: str = "success") -> None:
    ledger.record(CallRecord(
        call_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex, attempt=1, route="primary",
        ts_ms=0, sim_elapsed_s=None, run_id=run_id, agent="architect", provider="cloud",
        provider_kind="openai", model="gpt-5", local=False, input_tokens=1000,
        output_tokens=100, cached_tokens=0, reasoning_tokens=0, tokens_estimated=False,
        cost_usd=usd, latency_ms=1.0, status=status, error_class=None, error=None,
        event_id="e", task_id=None))


def _budget_alerts(journal: Journal) -> list[dict[str, object]]:
    alerts = [json.loads(m.payload) for m in journal.read_after(ALERTS, 0, 10_000)]
    return [a for a in alerts if str(a["kind"]).startswith("budget")]


@pytest.mark.parametrize(("spent", "budget", "expected"), [
    (0.0, 10.0, []), (4.99, 10.0, []), (5.0, 10.0, [50]), (7.5, 10.0, [50, 75]),
    (8.99, 10.0, [50, 75]), (9.0, 10.0, [50, 75, 90]), (10.0, 10.0, [50, 75, 90, 100]),
    (12.0, 10.0, [50, 75, 90, 100]), (0.0, 0.0, []), (0.01, 0.0, [50, 75, 90, 100]),
])
def test_crossed_thresholds(spent: float, budget: float, expected: list[int]) -> None:
    assert crossed_thresholds(spent, budget) == expected


def test_each_threshold_fires_once_even_across_restarts(short_dir: Path) -> None:
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_TEST_BUDGET": "10.00"})
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {"time_scale": 1.0, "duration_h": 24.0,
                                         "event_interval_min": 30.0, "budget_usd": 2.0})
    ledger = CostLedger(settings.costs_db)
    clock = ManualClock()
    controller = Controller(settings, clock=clock)
    controller.initialize()
    try:
        fired: list[int] = []
        # $0.30 a step against the run's own $2.00 budget (not TRINITY_TEST_BUDGET):
        # 50 % at $1.20, 75 % at $1.50, 90 % at $1.80, exceeded at $2.10.
        for step in range(10):
            _spend(ledger, run.run_id, 0.30)
            _spend(ledger, "another-run", 5.00)  # other runs' spend does not count
            _spend(ledger, run.run_id, 0.0, status="error")
            for _ in range(3):  # repeated checks must not repeat alerts
                clock.advance(1.5)
                controller.tick()
            fired = [int(a["details"]["threshold_pct"])  # type: ignore[index]
                     for a in _budget_alerts(journal)]
            spent = round(0.30 * (step + 1), 9)
            assert fired == crossed_thresholds(spent, 2.0), (step, fired)
    finally:
        controller.shutdown()

    # A restarted controller re-checks the same totals and raises nothing new.
    controller = Controller(settings, clock=clock)
    controller.initialize()
    try:
        clock.advance(5)
        controller.tick()
    finally:
        controller.shutdown()
    alerts = _budget_alerts(journal)
    assert [a["details"]["threshold_pct"] for a in alerts] == list(  # type: ignore[index]
        BUDGET_THRESHOLDS_PCT)
    severities = {a["details"]["threshold_pct"]: a["severity"] for a in alerts}  # type: ignore[index]
    assert severities == {50: "warning", 75: "warning", 90: "warning", 100: "error"}
    assert alerts[-1]["kind"] == "budget_exceeded" and "continues" in str(alerts[-1]["message"])
    assert all(a["run_id"] == run.run_id for a in alerts)
    ledger.close()
    journal.close()
