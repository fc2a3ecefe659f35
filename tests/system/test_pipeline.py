"""The whole chain on the embedded model, in real agent processes.

Acceptance (model calls): with no key and no server, event -> signal -> plan -> task
-> outcome runs on the embedded model, and every call is in the cost ledger with the
model's own token counts. A burst of events produces exactly one outcome per event and
a bounded number of journaled messages: per event one telemetry event, at most one
signal and at most one task (plus an alert per timed-out call), i.e. <= 3 per event.

The burst is ``TRINITY_BURST_EVENTS`` events (5 in ``make test``; ``make burst`` runs
100). WITNESS, ARCHITECT and EXECUTOR run as ``python -m trinity.cli agent NAME``;
events are journaled straight onto telemetry_stream, as the controller does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trinity.bus.journal import Journal
from trinity.bus.message import encode_payload
from trinity.contract import ALERTS, EXECUTION, IMPROVEMENT, TELEMETRY
from trinity.controller.process.scenario import event_for_cycle

AGENTS = ("witness", "architect", "executor")
BURST_EVENTS = int(os.environ.get("TRINITY_BURST_EVENTS", "5"))
# Generous per-event allowance for two model calls on a busy 2-core machine.
SECONDS_PER_EVENT = 15.0
MESSAGES_PER_EVENT = 3


class Pipeline:
    """The three agents on one data folder, and a journal to feed and inspect them."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="tp"))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TRINITY_", "OPENAI_", "OLLAMA_"))}
        env.update(TRINITY_DATA_DIR=str(self.root), TRINITY_RUN_DIR=str(self.root / "run"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name in AGENTS:
            with open(self.root / f"{name}.stderr", "wb") as err:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "trinity.cli", "agent", name], cwd=self.root,
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.journal = Journal(self.root / "trinity_messages.db", source="test")

    def emit(self, events: list[dict[str, Any]]) -> None:
        with self.journal.transaction() as tx:
            for event in events:
                tx.publish(TELEMETRY, encode_payload(event), key=event["event_id"])

    def outcomes(self) -> list[dict[str, Any]]:
        self.journal.conn.row_factory = sqlite3.Row
        try:
            rows = self.journal.conn.execute("SELECT * FROM outcomes ORDER BY task_id").fetchall()
        except sqlite3.OperationalError:  # table not created yet
            return []
        finally:
            self.journal.conn.row_factory = None
        return [dict(r) for r in rows]

    def wait_outcomes(self, n: int, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with {proc.returncode}:\n{self.stderr(name)}")
            found = self.outcomes()
            if len(found) >= n:
                time.sleep(1.0)  # anything more would be a duplicate: give it time to show
                return self.outcomes()
            time.sleep(0.2)
        pytest.fail(f"only {len(self.outcomes())} of {n} outcomes after {timeout_s:.0f} s")

    def messages(self, stream: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.journal.read_after(stream, 0, 100_000)]

    def ledger(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.root / "trinity_costs.db")
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY ts_ms")]
        finally:
            conn.close()

    def stderr(self, name: str) -> str:
        return (self.root / f"{name}.stderr").read_text(errors="replace")[-4000:]

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        self.journal.close()
        return codes


@pytest.fixture
def pipeline() -> Iterator[Pipeline]:
    p = Pipeline()
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(p.root, ignore_errors=True)


def _event(i: int) -> tuple[str, dict[str, Any]]:
    category, fields = event_for_cycle(i + 1)  # the run's own scenario, seed 0
    return category, {"event_id": f"burst/e{i:03d}", "run_id": None, **fields}


def test_event_to_outcome_on_the_embedded_model(pipeline: Pipeline) -> None:
    category, event = _event(0)
    assert category == "critical_error"
    pipeline.emit([event])
    (outcome,) = pipeline.wait_outcomes(1, timeout_s=120)

    (signal_,) = pipeline.messages(IMPROVEMENT)
    assert signal_["pattern"] == "critical_error" and signal_["event_id"] == "burst/e000"
    (task,) = pipeline.messages(EXECUTION)
    assert task["task_id"] == "burst/e000/t1"
    assert task["delegate"] == "AgencyCodeAgent" and task["product_kind"] == "proposed_change"
    assert task["plan"]["engine"] == "embedded" and task["plan"]["steps"]
    assert task["description"] and task["acceptance"]

    assert outcome["task_id"] == "burst/e000/t1"
    assert outcome["status"] == "done", outcome["product"]
    product = json.loads(outcome["product"])
    assert product["kind"] == "proposed_change" and product["engine"] == "embedded"
    assert {"file", "change", "rationale", "risk"} <= product.keys()

    calls = pipeline.ledger()
    succeeded = [c for c in calls if c["status"] == "success"]
    assert [(c["agent"], c["event_id"]) for c in succeeded] == [
        ("architect", "burst/e000"), ("executor", "burst/e000")]
    assert succeeded[1]["task_id"] == "burst/e000/t1"
    for call in calls:
        assert call["provider"] == "embedded" and call["local"] == 1
        assert call["cost_usd"] == 0.0
        # Counted by llama.cpp as it ran, not estimated; a failed attempt (a schema
        # miss) still reports what it consumed.
        assert call["tokens_estimated"] == 0
        assert call["input_tokens"] > 20 and call["output_tokens"] > 5
        assert call["latency_ms"] > 0
    assert len({c["call_id"] for c in calls}) == len(calls)
    assert pipeline.stop() == dict.fromkeys(AGENTS, 0)


@pytest.mark.timeout(int(BURST_EVENTS * SECONDS_PER_EVENT + 180))
def test_burst_gives_one_outcome_per_event_and_bounded_messages(pipeline: Pipeline) -> None:
    events = [_event(i)[1] for i in range(BURST_EVENTS)]
    pipeline.emit(events)
    outcomes = pipeline.wait_outcomes(BURST_EVENTS, timeout_s=BURST_EVENTS * SECONDS_PER_EVENT)

    assert len(outcomes) == BURST_EVENTS
    assert sorted(o["event_id"] for o in outcomes) == sorted(e["event_id"] for e in events)
    statuses = {o["status"] for o in outcomes}
    assert statuses <= {"done", "no_pattern", "failed", "plan_failed"}

    signals = pipeline.messages(IMPROVEMENT)
    tasks = pipeline.messages(EXECUTION)
    alerts = pipeline.messages(ALERTS)
    assert len(pipeline.messages(TELEMETRY)) == BURST_EVENTS
    assert len(signals) <= BURST_EVENTS and len(tasks) <= len(signals)
    timeouts = [a for a in alerts if a.get("kind") == "model_timeout"]
    journaled = sum(pipeline.journal.head(s) for s in (TELEMETRY, IMPROVEMENT, EXECUTION))
    assert journaled <= MESSAGES_PER_EVENT * BURST_EVENTS, journaled
    assert len(alerts) == len(timeouts)  # the only alerts an event can cause here
    assert pipeline.journal.dead_letters() == []

    # Every model call is in the ledger: one answered request per signal and per task.
    calls = pipeline.ledger()
    answered = {(c["agent"], c["request_id"]) for c in calls if c["status"] == "success"}
    assert len([a for a in answered if a[0] == "architect"]) == len(
        [o for o in outcomes if o["status"] != "no_pattern"]) - sum(
        o["status"] == "plan_failed" for o in outcomes)
    assert len([a for a in answered if a[0] == "executor"]) == sum(
        o["status"] == "done" for o in outcomes)
    assert len({c["call_id"] for c in calls}) == len(calls)
    assert pipeline.stop() == dict.fromkeys(AGENTS, 0)
