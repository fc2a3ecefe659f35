"""The three terminal dashboards: every figure shown equals the stores' (each expected
figure computed with the test's own queries, tests/controller/reports/_dashboards.py), on
stores written by the project's own writers; and a plain message, never a traceback, for
missing, empty or broken inputs. During a supervised compressed run, under tmux, and after
the session's whole compressed run: tests/system/test_dashboards.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.conftest import emit_every_event
from tests.controller.reports._dashboards import (
    assert_agent_rows,
    assert_clear,
    assert_shows,
    expected_cost,
    expected_patterns,
    expected_system,
    heartbeats,
    invoke,
    parse,
    render_text,
)
from trinity.agents.witness.embedding import load_embedder
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.clock import ManualClock, now_ms
from trinity.contract import EXECUTION, HEARTBEATS
from trinity.controller.ops import run as runner
from trinity.controller.process.controller import Controller
from trinity.controller.reports import dashboards
from trinity.controller.supervision.supervisord import supervisord_state
from trinity.settings import Settings
from trinity.stores import run_logs, runs
from trinity.stores.costs import CallRecord, CostLedger

# -- stores written by the project's own writers -----------------------------------------


@dataclass
class Stores:
    settings: Settings
    run_id: str


def _call(run_id: str, n: int, agent: str, model: str, cost: float, status: str,
          local: bool) -> CallRecord:
    return CallRecord(
        call_id=f"c{n}", request_id=f"r{n}", attempt=1, route="primary", ts_ms=now_ms(),
        sim_elapsed_s=30.0 * n, run_id=run_id, agent=agent,
        provider="embedded" if local else "cloud", provider_kind="embedded" if local
        else "openai", model=model, local=local, input_tokens=1000 * n + 7,
        output_tokens=300 + n, cached_tokens=0, reasoning_tokens=0, tokens_estimated=False,
        cost_usd=cost, latency_ms=20.0, status=status,
        error_class=None if status == "success" else "ModelError",
        error=None if status == "success" else status, event_id=None, task_id=None)


def _populate_ledger(settings: Settings, run_id: str) -> None:
    ledger = CostLedger(settings.costs_db)
    try:
        for n, (agent, model, cost, status, local) in enumerate((
                ("architect", "gpt-5", 0.8512, "success", False),
                ("architect", "SmolLM2-135M-Instruct", 0.0, "success", True),
                ("architect", "SmolLM2-135M-Instruct", 0.0, "success", True),
                ("executor", "gpt-5", 1.4, "success", False),
                ("executor", "gpt-5", 0.0, "timeout", False),
                ("executor", "SmolLM2-135M-Instruct", 0.0, "error", True),
                ("executor", "qwen2.5-coder:1.5b", 0.0, "success", True)), start=1):
            ledger.record(_call(run_id, n, agent, model, cost, status, local))
        ledger.record(_call("another-run", 99, "executor", "gpt-5", 5.0, "success", False))
    finally:
        ledger.close()


def _populate_patterns(settings: Settings, run_id: str, events: list[str]) -> None:
    embedder = load_embedder()
    store = PatternStore(settings.patterns_db, embedder)
    try:
        store.seed([("panic: runtime error: nil pointer dereference", "critical_error", "s1"),
                    ("Feature request: add dark mode", "feature_request", "s2")])
        labels = ("critical_error", "duplication", None, "critical_error", "flaky_test", None)
        for n, (event_id, pattern) in enumerate(zip(events, labels, strict=False)):
            store.record(Detection(pattern=pattern, label=pattern or "none",
                                   confidence=0.71 + 0.05 * n, probabilities={}, neighbours=(),
                                   vector=embedder.embed([event_id])[0], notes=()),
                         event_id=event_id, text=f"event {event_id}", run_id=run_id)
        store.record(Detection(pattern="duplication", label="duplication", confidence=0.5,
                               probabilities={}, neighbours=(), vector=embedder.embed(["o"])[0],
                               notes=()), event_id="another-run/c001", text="o",
                     run_id="another-run")
    finally:
        store.close()


def _populate_tasks(journal: Journal, run_id: str, events: list[str]) -> None:
    """ARCHITECT published three tasks and a failed plan; EXECUTOR applied two of the
    tasks (done, failed); WITNESS found no pattern in one event."""
    journal.declare(EXECUTION, ["executor"])
    tasks = [f"{events[0]}/t1", f"{events[0]}/t2", f"{events[1]}/t1"]
    with journal.transaction() as tx:
        published = [tx.publish(EXECUTION, encode_payload(
            {"task_id": t, "event_id": t.rsplit("/", 1)[0], "run_id": run_id}), key=t)
            for t in tasks]
        tx.publish(EXECUTION, encode_payload({"task_id": "x/t1", "run_id": "another-run"}),
                   key="x/t1")
    seq = published[1].seq if published[1] else 0
    with journal.transaction() as tx:
        tx.advance_cursor("executor", EXECUTION, seq)
        for task, status, product in zip(tasks[:2], ("done", "failed"), (
                '{"kind": "tests"}', '{"error": "both model attempts cut at max_tokens"}'),
                strict=True):
            tx.conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                            " recorded_ms, product) VALUES (?, ?, ?, 'TestGenerator', ?, ?, ?)",
                            (task, events[0], run_id, status, now_ms(), product))
        for task_id, event_id, delegate, status, product in (
                (f"{events[2]}/no_pattern", events[2], "witness", "no_pattern", None),
                (f"{events[3]}/plan", events[3], "architect", "plan_failed",
                 "all models failed:\n  local: timeout after 30 s")):
            tx.conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                            " recorded_ms, product) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (task_id, event_id, run_id, delegate, status, now_ms() + 1,
                             product))


@pytest.fixture
def stores(short_dir: Path) -> Stores:
    """A run the real controller drove (events, snapshots, heartbeats) plus the ledger,
    the pattern store and task outcomes as the agents write them."""
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_METRICS_PORT": "0",
                                  "TRINITY_HEARTBEAT_MAX_MISSED": "60"})
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {
        "time_scale": 1e6, "duration_h": 1.5, "event_interval_min": 30, "noise_events": 1,
        "budget_usd": 4.0, "metrics_interval_min": 5, "snapshot_interval_min": 60})
    runner.write_test_config(settings, run, short_dir / "supervisor.conf", resumed=False)
    controller = Controller(settings, clock=ManualClock())
    controller.initialize()
    try:
        emit_every_event(controller, journal, run)
        for agent in ("witness", "architect", "executor"):
            beat = {"agent": agent, "pid": os.getpid(), "ts_ms": now_ms(), "counters": {}}
            controller.handle_ephemeral(Message(HEARTBEATS, 0, f"hb-{agent}", agent, now_ms(),
                                                encode_payload(beat)))
    finally:
        controller.shutdown()
    with journal.transaction() as tx:
        tx.conn.execute("UPDATE agents SET last_heartbeat_ms = last_heartbeat_ms - 90000"
                        " WHERE name='executor'")
    events = [e for (e,) in journal.conn.execute(
        "SELECT event_id FROM events WHERE run_id=? ORDER BY cycle, noise", (run.run_id,))]
    _populate_tasks(journal, run.run_id, events)
    journal.close()
    _populate_patterns(settings, run.run_id, events)
    _populate_ledger(settings, run.run_id)
    return Stores(settings, run.run_id)


# -- fast tests ---------------------------------------------------------------------------


def test_cost_dashboard_shows_the_ledger(stores: Stores) -> None:
    view = dashboards.gather("cost", stores.settings)
    shown = parse(render_text(view))
    expected = expected_cost(stores.settings.data_dir, stores.run_id)
    assert_shows(shown, expected)
    # The figures are the run's: the other run's $5 call is in neither.
    assert shown["TOTAL COST"] == "$2.2512 / $4.00 (56.3%)"
    assert shown[("BY MODEL", "gpt-5")] == "$2.2512 (10,931 tokens)"
    assert shown["CALLS"] == "7 total (5 success, 1 error, 1 timeout)"
    assert shown[("BY AGENT", "WITNESS")] == "$0.0000 (no model calls)"


def test_pattern_dashboard_shows_the_stores(stores: Stores) -> None:
    shown = parse(render_text(dashboards.gather("patterns", stores.settings)))
    assert_shows(shown, expected_patterns(stores.settings.data_dir, stores.run_id))
    # Three cycles with one noise event each; six classified; the other run's not counted.
    assert shown["EVENTS PROCESSED"] == "6 / 6 expected (6 emitted)"
    assert shown["TASKS CREATED"] == "3 by ARCHITECT (1 plan failed)"
    assert shown["TASKS EXECUTED"] == "2 by EXECUTOR (1 done, 1 failed)"
    assert shown[("BY PATTERN TYPE", "critical_error")] == "2 detections (avg conf: 0.79)"
    # The failed plan and the failed task are listed, the latest first, with their reasons.
    failed = [(k[1], v) for k, v in shown.items() if isinstance(k, tuple)
              and k[0] == "FAILED (2, latest first)"]
    assert [v for _, v in failed] == ["all models failed: local: timeout after 30 s",
                                      "both model attempts cut at max_tokens"]
    assert [k.rsplit("/", 1)[1] for k, _ in failed] == ["plan", "t2"]


def test_rendering_keeps_the_longest_pattern_name_apart_from_its_figure(
        stores: Stores) -> None:
    view = dashboards.gather("patterns", stores.settings)
    assert isinstance(view, dashboards.PatternView) and view.stats is not None
    detections = {**view.stats["detections"],
                  "by_type": {**view.stats["detections"]["by_type"],
                              "constitution_violation": 12},
                  "average_confidence_by_type": {"constitution_violation": 0.9}}
    text = render_text(dataclasses.replace(view, stats={**view.stats,
                                                        "detections": detections}))
    assert "  constitution_violation   12 detections (avg conf: 0.90)" in text.splitlines()
    assert parse(text)[("BY PATTERN TYPE", "constitution_violation")] == \
        "12 detections (avg conf: 0.90)"


def test_system_dashboard_shows_the_stores_and_heartbeats(stores: Stores) -> None:
    root = stores.settings.data_dir
    before = heartbeats(root)
    started = now_ms()
    view = dashboards.gather("system", stores.settings, None,
                             lambda: supervisord_state(root / "supervisor.conf"))
    ended = now_ms()
    shown = parse(render_text(view))
    assert_shows(shown, expected_system(root, stores.run_id))
    assert isinstance(view, dashboards.SystemView)
    assert set(view.queues) >= {"telemetry_stream", "execution_queue"}
    section = next(k[0] for k in shown if isinstance(k, tuple) and k[0].startswith("AGENTS"))
    # No supervisor.conf here: judged by the heartbeat alone (deadline 60 s in this
    # fixture); EXECUTOR's is 90 s old.
    assert section == f"AGENTS ALIVE (supervisord unknown (no {root / 'supervisor.conf'}))"
    assert_agent_rows(shown, section, before, heartbeats(root), started, ended, None)
    assert shown[(section, "WITNESS")].startswith("✓")
    assert shown[(section, "EXECUTOR")].startswith("✗")


def test_a_database_size_is_rounded_once(stores: Stores) -> None:
    """0.74996 MB is "0.7 MB": rounding to 0.750 first and then to one decimal showed
    "0.8 MB" (seen as a rare mismatch against the files during a run)."""
    costs = stores.settings.costs_db
    for suffix in ("-wal", "-shm"):
        Path(f"{costs}{suffix}").unlink(missing_ok=True)
    size = 786_400  # 0.74996 MB
    assert round(size / 1048576, 3) == 0.75 and f"{size / 1048576:.1f}" == "0.7"
    with costs.open("r+b") as fh:
        fh.truncate(size)
    shown = parse(render_text(dashboards.gather("system", stores.settings)))
    assert shown[("DATABASE SIZES", costs.name)] == "0.7 MB"
    assert_shows(shown, expected_system(stores.settings.data_dir, stores.run_id))


def test_an_older_run_is_shown_with_run(stores: Stores) -> None:
    journal = Journal(stores.settings.messages_db, source="test")
    newer = runs.create_run(journal.conn, {"time_scale": 60, "duration_h": 1,
                                           "event_interval_min": 30, "budget_usd": 1.0})
    journal.close()
    latest = parse(render_text(dashboards.gather("cost", stores.settings)))
    assert latest["RUN"] == f"{newer.run_id} (active, time scale 60x)"
    assert latest["CALLS"] == "0 total (0 success, 0 error, 0 timeout)"
    older = parse(render_text(dashboards.gather("cost", stores.settings, stores.run_id)))
    assert_shows(older, expected_cost(stores.settings.data_dir, stores.run_id))
    # A new run moves the previous run's logs aside; its metrics are found there.
    expected = expected_system(stores.settings.data_dir, stores.run_id)
    archived = run_logs.archive(stores.settings.log_dir)
    assert archived == stores.settings.log_dir.parent / "archive" / stores.run_id
    system = parse(render_text(dashboards.gather("system", stores.settings, stores.run_id)))
    assert_shows(system, {k: v for k, v in expected.items() if k != "RUN"})
    assert system["RUN"] == f"{stores.run_id} (stopped, time scale 1e+06x)"


@pytest.mark.parametrize("kind", dashboards.KINDS)
def test_no_run_data_is_said_plainly(short_dir: Path, kind: str) -> None:
    result = invoke(short_dir, kind)
    assert_clear(result, 0, "no run data", "trinity_messages.db does not exist yet")
    assert not (short_dir / "trinity_messages.db").exists()  # read only: nothing created
    Journal(short_dir / "trinity_messages.db", source="test").close()
    assert_clear(invoke(short_dir, kind), 0, "no run data", "has no run recorded yet")


@pytest.mark.parametrize("kind", dashboards.KINDS)
def test_a_corrupt_store_is_one_clear_error(stores: Stores, kind: str) -> None:
    db = {"cost": "trinity_costs.db", "patterns": "trinity_patterns.db",
          "system": "trinity_messages.db"}[kind]
    path = stores.settings.data_dir / db
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 200)
    result = invoke(stores.settings.data_dir, kind)
    assert_clear(result, 1, f"Error: cannot read {path}", "not a database")
    assert len(result.output.strip().splitlines()) == 1


def test_an_unknown_run_is_one_clear_error(stores: Stores, short_dir: Path) -> None:
    result = invoke(stores.settings.data_dir, "patterns", "--run", "no-such-run")
    assert_clear(result, 1, "Error: no run 'no-such-run' recorded in")


def test_missing_empty_and_partly_written_log_dirs(stores: Stores) -> None:
    root = stores.settings.data_dir
    logs = root / "logs" / "24h_test"
    metrics = logs / "metrics"
    *_, older, shaped, newest = sorted(metrics.glob("system_metrics_*.json"))
    # Partly written: the newest sample cut short, the one before it of another shape; the
    # one before those is shown, and the dashboard says so.
    newest.write_text(newest.read_text()[:40])
    sample = json.loads(shaped.read_text())
    shaped.write_text(json.dumps({**sample, "cpu_percent": "high",
                                  "processes": {"witness": 3}}))
    result = invoke(root, "system")
    assert_clear(result, 0, f"2 unreadable newer sample(s) skipped: {newest.name}, "
                             f"{shaped.name}")
    assert parse(result.output)["SAMPLE"].startswith(f"{older.name} (simulated ")
    for other in metrics.glob("system_metrics_*.json"):
        if other not in (newest, shaped):
            other.unlink()
    assert_clear(invoke(root, "system"), 0, "no system metrics yet",
                  f"no system metrics sample of run {stores.run_id}", "(2 unreadable:")
    shutil.rmtree(metrics)
    assert_clear(invoke(root, "system"), 0, f"no metrics folder in {logs} yet")
    shutil.rmtree(logs.parent)
    result = invoke(root, "system")
    assert_clear(result, 0, f"log directory {logs} does not exist", "MESSAGE QUEUES:",
                  "AGENTS ALIVE")
    for kind in ("cost", "patterns"):  # they read the stores only
        assert_clear(invoke(root, kind), 0, "TOTAL COST:" if kind == "cost" else "TASKS")


def test_refresh_intervals_follow_the_time_scale() -> None:
    assert dashboards.refresh_interval_s("cost", 1) == 5
    assert dashboards.refresh_interval_s("patterns", 1) == 60
    assert dashboards.refresh_interval_s("system", 1) == 300
    assert dashboards.refresh_interval_s("patterns", 60) == 1
    assert dashboards.refresh_interval_s("system", 120) == 2.5
    assert dashboards.refresh_interval_s("cost", 2880) == dashboards.MIN_REFRESH_S == 0.5


def test_live_refreshes_at_the_runs_scaled_interval(stores: Stores) -> None:
    # The run's scale (1e6) decides, not the dashboard's own environment (scale 1).
    console = Console(file=StringIO(), width=200, record=True, force_terminal=True)
    slept: list[float] = []
    frames: list[int] = []

    def frame() -> tuple[Any, float]:
        frames.append(1)
        return dashboards.live_frame("patterns", stores.settings, None, None)

    dashboards.show_live(frame, console, refreshes=3, sleep=slept.append)
    assert len(frames) == 3 and slept == [0.5, 0.5]
    text = console.export_text()
    assert "TRINITY PROTOCOL - PATTERN DETECTION" in text and "EVENTS PROCESSED:" in text
    assert "refreshing every 0.5 s real (60 s simulated at time scale 1e+06x)" in text


def test_live_waits_for_a_run_and_shows_a_broken_store(short_dir: Path) -> None:
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_TIME_SCALE": "60"})
    frame, interval = dashboards.live_frame("system", settings, None, None)
    assert interval == 5  # 300 s / 60, and never slower than WAITING_REFRESH_S
    assert "no run data" in render_text_of(frame)
    frame, interval = dashboards.live_frame("patterns", settings, None, None)
    assert interval == 1
    settings.messages_db.write_bytes(b"garbage" * 1000)
    frame, interval = dashboards.live_frame("cost", settings, None, None)
    assert interval == 0.5  # 5 s / 60, floored
    assert f"error: cannot read {settings.messages_db}" in render_text_of(frame)


def test_keyboard_interrupt_ends_live_quietly(stores: Stores) -> None:
    console = Console(file=StringIO(), width=200, force_terminal=True)

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    dashboards.show_live(lambda: dashboards.live_frame("cost", stores.settings, None, None),
                         console, sleep=interrupted)


def render_text_of(renderable: Any) -> str:
    console = Console(file=StringIO(), width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()
