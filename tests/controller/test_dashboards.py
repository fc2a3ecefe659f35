"""The three terminal dashboards: every figure shown equals the stores' (each expected
figure computed here with the test's own queries), on stores written by the project's own
writers, during a supervised compressed run and after a whole compressed 24-hour run; under
tmux; and a plain message, never a traceback, for missing, empty or broken inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from tests.conftest import Project, emit_every_event, wait_for
from trinity.agents.witness.embedding import load_embedder
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.cli.reports import dashboard as dashboard_command
from trinity.clock import ManualClock, now_ms
from trinity.contract import EXECUTION, HEARTBEATS
from trinity.controller.ops import run as runner
from trinity.controller.process.controller import Controller
from trinity.controller.reports import dashboards
from trinity.controller.supervision.supervisord import supervisord_state
from trinity.settings import Settings
from trinity.stores import run_logs, runs
from trinity.stores.costs import CallRecord, CostLedger

Figures = dict[Any, str]
AGENTS = ("WITNESS", "ARCHITECT", "EXECUTOR")
PATTERNS = ("critical_error", "constitution_violation", "feature_request", "duplication",
            "flaky_test")


# -- reading what a dashboard shows ------------------------------------------------------


def render_text(view: dashboards.View, width: int = 200) -> str:
    console = Console(file=StringIO(), width=width, record=True, color_system=None)
    console.print(dashboards.render(view))
    return console.export_text()


_FIELD = re.compile(r"^([A-Z][A-Za-z /()]*[A-Za-z)]):\s+(.+)$")


def parse(text: str) -> Figures:
    """``LABEL: value`` lines by label; the indented rows under a ``SECTION:`` line by
    (section, name)."""
    figures: Figures = {}
    section = ""
    for line in text.splitlines():
        line = line.rstrip()
        if line.startswith("  ") and section:
            name, value = (re.split(r"\s{2,}", line.strip(), maxsplit=1) + [""])[:2]
            figures[(section, name)] = value
        elif line[:1].isupper() and line.endswith(":"):
            section = line[:-1]
        elif match := _FIELD.match(line):
            figures[match.group(1)] = match.group(2)
    return figures


def assert_shows(shown: Figures, expected: Figures) -> None:
    mismatched = {k: (shown.get(k), v) for k, v in expected.items() if shown.get(k) != v}
    assert not mismatched, mismatched


# -- the expected figures, from the test's own queries -----------------------------------


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def _hms(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"


def _run_row(root: Path, run_id: str) -> tuple[str, dict[str, Any], float]:
    conn = _ro(root / "trinity_messages.db")
    try:
        status, config, sim = conn.execute(
            "SELECT status, config, sim_elapsed_s FROM runs WHERE run_id=?", (run_id,)).fetchone()
    finally:
        conn.close()
    return status, json.loads(config), float(sim)


def expected_cost(root: Path, run_id: str) -> Figures:
    status, config, sim = _run_row(root, run_id)
    budget, duration_s = float(config["budget_usd"]), float(config["duration_h"]) * 3600
    conn = _ro(root / "trinity_costs.db")
    try:
        total, calls, ok, err, late = conn.execute(
            "SELECT coalesce(sum(cost_usd), 0), count(*), sum(status='success'),"
            " sum(status='error'), sum(status='timeout') FROM calls WHERE run_id=?",
            (run_id,)).fetchone()
        agents = conn.execute("SELECT upper(agent), sum(cost_usd), count(*), sum(local)"
                              " FROM calls WHERE run_id=? GROUP BY agent", (run_id,)).fetchall()
        models = conn.execute("SELECT model, sum(cost_usd), sum(input_tokens + output_tokens)"
                              " FROM calls WHERE run_id=? GROUP BY model", (run_id,)).fetchall()
    finally:
        conn.close()
    figures: Figures = {
        "RUN": f"{run_id} ({status}, time scale {config['time_scale']:g}x)",
        "TOTAL COST": f"${total:,.4f} / ${budget:,.2f} ({total / budget:.1%})",
        "ELAPSED": f"{_hms(sim)} / {_hms(duration_s)}",
        "REMAINING": f"${budget - total:,.4f} budget, {_hms(duration_s - sim)} time",
        "CALLS": f"{calls:,} total ({ok or 0:,} success, {err or 0:,} error, "
                 f"{late or 0:,} timeout)",
        "SUCCESS RATE": f"{round(ok / calls, 4):.1%}" if calls else "-",
    }
    figures |= {("BY AGENT", name): "$0.0000 (no model calls)" for name in AGENTS}
    figures |= {("BY AGENT", name): f"${cost:,.4f} ({local / n:.0%} local, {n:,} calls)"
                for name, cost, n, local in agents}
    figures |= {("BY MODEL", model): f"${cost:,.4f} ({tokens:,} tokens)"
                for model, cost, tokens in models}
    return figures


def _pending_tasks(journal: sqlite3.Connection, run_id: str) -> int:
    cursor = journal.execute("SELECT seq FROM cursors WHERE consumer='executor' AND stream=?",
                             (EXECUTION,)).fetchone()
    payloads = journal.execute("SELECT payload FROM messages WHERE stream=? AND seq>?",
                               (EXECUTION, cursor[0] if cursor else 0)).fetchall()
    return sum(json.loads(bytes(p)).get("run_id") == run_id for (p,) in payloads)


def expected_patterns(root: Path, run_id: str) -> Figures:
    status, config, sim = _run_row(root, run_id)
    journal = _ro(root / "trinity_messages.db")
    try:
        events = dict(journal.execute(
            "SELECT event_id, category FROM events WHERE run_id=?", (run_id,)).fetchall())
        times = dict(journal.execute(
            "SELECT event_id, sim_elapsed_s FROM events WHERE run_id=?", (run_id,)).fetchall())
        executed = dict(journal.execute(
            "SELECT o.status, count(*) FROM outcomes o JOIN events e USING(event_id)"
            " WHERE e.run_id=? AND o.delegate NOT IN ('witness', 'architect')"
            " GROUP BY o.status", (run_id,)).fetchall())
        failed_plans = journal.execute(
            "SELECT count(*) FROM outcomes o JOIN events e USING(event_id)"
            " WHERE e.run_id=? AND o.delegate='architect'", (run_id,)).fetchone()[0]
        pending = _pending_tasks(journal, run_id)
    finally:
        journal.close()
    store = _ro(root / "trinity_patterns.db")
    try:
        found = {e: (p, c) for e, p, c in store.execute(
            "SELECT event_id, pattern, confidence FROM detections WHERE run_id=?", (run_id,))}
        exemplars = store.execute("SELECT count(*) FROM exemplars").fetchone()[0]
        learned = {e for (e,) in store.execute(
            "SELECT event_id FROM exemplars WHERE event_id IS NOT NULL")}
        cross = store.execute("SELECT coalesce(sum(cross_session), 0) FROM detections"
                              ).fetchone()[0]
        history = [c for (c,) in store.execute(
            "SELECT confidence FROM detections WHERE pattern IS NOT NULL"
            " ORDER BY detected_ms, rowid")]
    finally:
        store.close()
    cycles = int(config["duration_h"] * 60 // config["event_interval_min"])
    expected_events = cycles * (1 + int(config.get("noise_events", 0)))
    classified = [e for e in events if e in found]
    pattern_events = [e for e in classified if events[e] != "none"]
    detected = sum(found[e][0] is not None for e in pattern_events)
    noise = [e for e in classified if events[e] == "none"]
    signals = [(p, c) for p, c in found.values() if p is not None]
    half = len(history) // 2
    trend = (sum(history[half:]) / (len(history) - half) - sum(history[:half]) / half
             if half else 0.0)
    word = "improving" if round(trend, 4) > 0 else "declining" if round(trend, 4) < 0 else "flat"
    done = sum(executed.values())
    figures: Figures = {
        "RUN": f"{run_id} ({status}, time scale {config['time_scale']:g}x)",
        "EVENTS PROCESSED": f"{len(classified):,} / {expected_events:,} expected "
                            f"({len(events):,} emitted)",
        "PATTERNS DETECTED": f"{detected:,} / {len(pattern_events):,}"
                             + (f" ({detected / len(pattern_events):.1%})"
                                if pattern_events else ""),
        "SIGNALS PUBLISHED": f"{len(signals):,} → improvement_queue",
        "TASKS CREATED": f"{done + pending:,} by ARCHITECT"
                         + (f" ({failed_plans:,} plan{'' if failed_plans == 1 else 's'} failed)"
                            if failed_plans else ""),
        "TASKS EXECUTED": f"{done:,} by EXECUTOR" + (
            " (" + ", ".join(f"{n:,} {s}" for s, n in sorted(executed.items())) + ")"
            if executed else ""),
        ("LEARNING", "Patterns in store:"): f"{exemplars:,} total",
        ("LEARNING", "New in the last hour:"): str(sum(
            1 for e, t in times.items() if sim - 3600 < t <= sim and e in learned)),
        ("LEARNING", "Cross-session matches:"): f"{cross:,}",
        ("LEARNING", "Confidence trending:"): f"{round(trend, 4):+.3f} ({word})",
    }
    if noise:
        figures["NOISE EVENTS"] = (f"{len(noise):,} classified, "
                                   f"{sum(found[e][0] is not None for e in noise):,} taken "
                                   "for a pattern")
    for pattern in PATTERNS:
        confs = [c for p, c in signals if p == pattern]
        mean = f"{round(sum(confs) / len(confs), 4):.2f}" if confs else "-"
        figures[("BY PATTERN TYPE", pattern)] = (f"{len(confs):>3} detections (avg conf: "
                                                 f"{mean})").strip()
    return figures


def latest_sample(root: Path, run_id: str) -> tuple[str, dict[str, Any]]:
    samples = {p.name: json.loads(p.read_text()) for p in
               (root / "logs" / "24h_test" / "metrics").glob("system_metrics_*.json")}
    name = max(n for n, s in samples.items() if s["run_id"] == run_id)
    return name, samples[name]


def expected_system(root: Path, run_id: str) -> Figures:
    status, config, sim = _run_row(root, run_id)
    name, sample = latest_sample(root, run_id)
    largest = max(sample["processes"], key=lambda p: sample["processes"][p]["rss_mb"])
    peak = sample["memory_max_process_rss_mb"]
    journal = _ro(root / "trinity_messages.db")
    try:
        queues = journal.execute("SELECT s.stream, max(s.head - c.seq) FROM streams s, cursors c"
                                 " WHERE c.stream = s.stream GROUP BY s.stream").fetchall()
    finally:
        journal.close()
    figures: Figures = {
        "RUN": f"{run_id} ({status}, time scale {config['time_scale']:g}x)",
        "MEMORY": f"{peak:.0f} MB / 500 MB limit ({peak / 500:.1%}), {largest}",
        "MEMORY (all)": f"{sample['memory_mb']:,.0f} MB PSS in {len(sample['processes'])} "
                        + ("process" if len(sample["processes"]) == 1 else "processes"),
        "CPU (avg)": f"{sample['cpu_percent']:.1f}% "
                     f"(last {config.get('metrics_interval_min', 5):g} min)",
        "DISK I/O": f"{sample['disk_read_mb']:,.1f} MB read, "
                    f"{sample['disk_write_mb']:,.1f} MB write",
        "SAMPLE": f"{name} (simulated {_hms(sample['sampled_sim_elapsed_s'])})",
    }
    figures |= {("MESSAGE QUEUES", stream): f"{pending} pending" for stream, pending in queues}
    for db in ("trinity_patterns.db", "trinity_messages.db", "trinity_costs.db"):
        size = sum(os.stat(f"{root / db}{s}").st_size for s in ("", "-wal", "-shm")
                   if os.path.exists(f"{root / db}{s}"))
        figures[("DATABASE SIZES", db)] = f"{size / 1048576:.1f} MB"
    return figures


def heartbeats(root: Path) -> dict[str, int]:
    conn = _ro(root / "trinity_messages.db")
    try:
        return {n.upper(): int(t) for n, t in conn.execute(
            "SELECT name, last_heartbeat_ms FROM agents")}
    finally:
        conn.close()


def assert_agent_rows(shown: Figures, section: str, before: dict[str, int],
                      after: dict[str, int], started_ms: int, ended_ms: int,
                      alive: bool | None) -> None:
    """Each agent's row: its mark, and an age between the shown instant minus the last
    heartbeats read just before and just after rendering."""
    for agent in AGENTS:
        row = shown[(section, agent)]
        match = re.fullmatch(r"([✓✗]) \(last heartbeat: (.+) ago\)", row)
        assert match, row
        if alive is not None:
            assert match.group(1) == ("✓" if alive else "✗"), row
        age = match.group(2)
        if age.endswith("s") and "h" not in age:
            age_s = float(age[:-1])
        else:
            h, m, s = (int(x) for x in re.findall(r"\d+", age))
            age_s = h * 3600 + m * 60 + s
        low = (started_ms - after[agent]) / 1000 - 0.6
        high = (ended_ms - before[agent]) / 1000 + 0.6
        assert low <= age_s <= high, (agent, low, age_s, high)


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
        for task, status in zip(tasks[:2], ("done", "failed"), strict=True):
            tx.conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                            " recorded_ms) VALUES (?, ?, ?, 'TestGenerator', ?, ?)",
                            (task, events[0], run_id, status, now_ms()))
        for task_id, event_id, delegate, status in (
                (f"{events[2]}/no_pattern", events[2], "witness", "no_pattern"),
                (f"{events[3]}/plan", events[3], "architect", "plan_failed")):
            tx.conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                            " recorded_ms) VALUES (?, ?, ?, ?, ?, ?)",
                            (task_id, event_id, run_id, delegate, status, now_ms()))


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


def _invoke(root: Path, *args: str) -> Any:
    env = {"TRINITY_DATA_DIR": str(root), "COLUMNS": "200"}
    return CliRunner().invoke(dashboard_command, list(args), env=env)


def _assert_clear(result: Any, code: int, *phrases: str) -> None:
    """Exit ``code``, each phrase in the output, and no traceback (CliRunner catches any
    exception but SystemExit, which is how click ends a command)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


@pytest.mark.parametrize("kind", dashboards.KINDS)
def test_no_run_data_is_said_plainly(short_dir: Path, kind: str) -> None:
    result = _invoke(short_dir, kind)
    _assert_clear(result, 0, "no run data", "trinity_messages.db does not exist yet")
    assert not (short_dir / "trinity_messages.db").exists()  # read only: nothing created
    Journal(short_dir / "trinity_messages.db", source="test").close()
    _assert_clear(_invoke(short_dir, kind), 0, "no run data", "has no run recorded yet")


@pytest.mark.parametrize("kind", dashboards.KINDS)
def test_a_corrupt_store_is_one_clear_error(stores: Stores, kind: str) -> None:
    db = {"cost": "trinity_costs.db", "patterns": "trinity_patterns.db",
          "system": "trinity_messages.db"}[kind]
    path = stores.settings.data_dir / db
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 200)
    result = _invoke(stores.settings.data_dir, kind)
    _assert_clear(result, 1, f"Error: cannot read {path}", "not a database")
    assert len(result.output.strip().splitlines()) == 1


def test_an_unknown_run_is_one_clear_error(stores: Stores, short_dir: Path) -> None:
    result = _invoke(stores.settings.data_dir, "patterns", "--run", "no-such-run")
    _assert_clear(result, 1, "Error: no run 'no-such-run' recorded in")


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
    result = _invoke(root, "system")
    _assert_clear(result, 0, f"2 unreadable newer sample(s) skipped: {newest.name}, "
                             f"{shaped.name}")
    assert parse(result.output)["SAMPLE"].startswith(f"{older.name} (simulated ")
    for other in metrics.glob("system_metrics_*.json"):
        if other not in (newest, shaped):
            other.unlink()
    _assert_clear(_invoke(root, "system"), 0, "no system metrics yet",
                  f"no system metrics sample of run {stores.run_id}", "(2 unreadable:")
    shutil.rmtree(metrics)
    _assert_clear(_invoke(root, "system"), 0, f"no metrics folder in {logs} yet")
    shutil.rmtree(logs.parent)
    result = _invoke(root, "system")
    _assert_clear(result, 0, f"log directory {logs} does not exist", "MESSAGE QUEUES:",
                  "AGENTS ALIVE")
    for kind in ("cost", "patterns"):  # they read the stores only
        _assert_clear(_invoke(root, kind), 0, "TOTAL COST:" if kind == "cost" else "TASKS")


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


# -- a supervised run ----------------------------------------------------------------------


def _pids(project: Project) -> list[int]:
    return [p["pid"] for p in project.supervisor().process_info() if p["pid"]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dashboards_during_a_compressed_run_and_under_tmux(project: Project) -> None:
    result = project.trinity("run", "--detach", "--duration", "12", "--time-scale", "720")
    assert result.returncode == 0, result.stdout + result.stderr
    root = project.root
    db = root / "trinity_messages.db"

    def executed() -> bool:
        conn = _ro(db)
        try:
            return bool(conn.execute("SELECT count(*) FROM outcomes WHERE delegate NOT IN"
                                     " ('witness', 'architect')").fetchone()[0] >= 2)
        finally:
            conn.close()

    wait_for(executed, 240, "two tasks executed")
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(root)})
    run_id = _run_id(root)
    # Hold every program still, so the stores do not move between the dashboard's read and
    # the test's own; the run goes on afterwards.
    pids = _pids(project)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        before, started = heartbeats(root), now_ms()
        views = {kind: dashboards.gather(kind, settings, None,
                                         lambda: supervisord_state(project.config))
                 for kind in dashboards.KINDS}
        ended = now_ms()
        shown = {kind: parse(render_text(view)) for kind, view in views.items()}
        assert shown["cost"]["RUN"] == f"{run_id} (active, time scale 720x)"
        assert_shows(shown["cost"], expected_cost(root, run_id))
        assert_shows(shown["patterns"], expected_patterns(root, run_id))
        assert_shows(shown["system"], expected_system(root, run_id))
        section = "AGENTS ALIVE (supervisord running)"
        assert_agent_rows(shown["system"], section, before, heartbeats(root), started, ended,
                          None)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    _under_tmux(project)


def _run_id(root: Path) -> str:
    conn = _ro(root / "trinity_messages.db")
    try:
        return str(conn.execute("SELECT run_id FROM runs ORDER BY started_ms DESC LIMIT 1"
                                ).fetchone()[0])
    finally:
        conn.close()


def _under_tmux(project: Project) -> None:
    """``dashboard system --live`` in a detached tmux session of fixed size: the panels are
    on its screen, the agents alive from their real heartbeats."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed")
    server = f"trdash{os.getpid()}"
    code = ("from trinity.cli.reports import dashboard; "
            "dashboard(['system', '--live'])")
    env = {**project.env, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color"}
    tmux = ["tmux", "-u", "-L", server]
    subprocess.run([*tmux, "-f", "/dev/null", "new-session", "-d", "-s", "dash", "-x", "110",
                    "-y", "45", f"{sys.executable} -c \"{code}\""], check=True, env=env,
                   cwd=project.root, timeout=30)
    try:
        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "dash"], env=env,
                                  capture_output=True, text=True, timeout=10).stdout

        def all_alive() -> str | None:
            text = screen()
            rows = [line for line in text.splitlines() if "last heartbeat" in line]
            return text if len(rows) == 3 and all("✓" in r for r in rows) else None

        text = wait_for(all_alive, 60, "three agents alive on the tmux screen")
        assert isinstance(text, str)
        for heading in ("TRINITY PROTOCOL - SYSTEM HEALTH", "UPTIME:", "MEMORY:", "CPU (avg):",
                        "DISK I/O:", "MESSAGE QUEUES:", "telemetry_stream", "DATABASE SIZES:",
                        "trinity_patterns.db", "AGENTS ALIVE (supervisord running):",
                        "refreshing every 0.5 s real (300 s simulated at time scale 720x)"):
            assert heading in text, text
        for agent in AGENTS:
            assert re.search(rf"^  {agent}\s+✓ \(last heartbeat: \d+\.\ds ago\)", text,
                             re.MULTILINE), text
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, timeout=30)


# -- after a whole compressed 24-hour run ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dashboards_after_the_compressed_24h_run(compressed_24h_run: Any) -> None:
    project, _ = compressed_24h_run
    root = project.root
    run_id = _run_id(root)
    before = heartbeats(root)
    started = now_ms()
    results = {kind: _invoke(root, kind) for kind in dashboards.KINDS}
    ended = now_ms()
    for kind, result in results.items():
        _assert_clear(result, 0, dashboards.TITLES[kind])
    shown = {kind: parse(result.output) for kind, result in results.items()}
    assert_shows(shown["cost"], expected_cost(root, run_id))
    assert_shows(shown["patterns"], expected_patterns(root, run_id))
    assert_shows(shown["system"], expected_system(root, run_id))
    assert shown["cost"]["RUN"] == f"{run_id} (completed, time scale 2880x)"
    assert shown["cost"]["ELAPSED"] == "24h 00m 00s / 24h 00m 00s"
    assert shown["patterns"]["EVENTS PROCESSED"] == "48 / 48 expected (48 emitted)"
    # The run is over and supervisord stopped: no agent is alive, whatever its last beat.
    section = "AGENTS ALIVE (supervisord not running)"
    assert_agent_rows(shown["system"], section, before, heartbeats(root), started, ended, False)
