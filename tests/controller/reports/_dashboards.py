"""What a dashboard shows, and the figures it must show, each computed with the test's
own queries on the stores: shared by the dashboards' tests on stores written by the
project's own writers (tests/controller/reports/test_dashboards.py) and on supervised runs
(tests/system/test_dashboards.py)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from io import StringIO
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from rich.console import Console

from trinity.cli.reports import dashboard as dashboard_command
from trinity.contract import EXECUTION
from trinity.controller.reports import dashboards

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


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def _hms(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"


def _run_row(root: Path, run_id: str) -> tuple[str, dict[str, Any], float]:
    conn = read_only(root / "trinity_messages.db")
    try:
        status, config, sim = conn.execute(
            "SELECT status, config, sim_elapsed_s FROM runs WHERE run_id=?", (run_id,)).fetchone()
    finally:
        conn.close()
    return status, json.loads(config), float(sim)


def expected_cost(root: Path, run_id: str) -> Figures:
    status, config, sim = _run_row(root, run_id)
    budget, duration_s = float(config["budget_usd"]), float(config["duration_h"]) * 3600
    conn = read_only(root / "trinity_costs.db")
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
    journal = read_only(root / "trinity_messages.db")
    try:
        events = dict(journal.execute(
            "SELECT event_id, category FROM events WHERE run_id=?", (run_id,)).fetchall())
        times = dict(journal.execute(
            "SELECT event_id, sim_elapsed_s FROM events WHERE run_id=?", (run_id,)).fetchall())
        # the run's events: the controller's, and those `trinity emit` sent during it
        run_events = ("(SELECT event_id FROM events WHERE run_id=:run UNION ALL"
                      " SELECT event_id FROM emitted_events WHERE run_id=:run)")
        executed = dict(journal.execute(
            f"SELECT o.status, count(*) FROM outcomes o JOIN {run_events} USING(event_id)"
            " WHERE o.delegate NOT IN ('witness', 'architect')"
            " GROUP BY o.status", {"run": run_id}).fetchall())
        failed_plans = journal.execute(
            f"SELECT count(*) FROM outcomes o JOIN {run_events} USING(event_id)"
            " WHERE o.delegate='architect'", {"run": run_id}).fetchone()[0]
        failed = journal.execute(
            f"SELECT o.task_id, o.product FROM outcomes o JOIN {run_events} USING(event_id)"
            " WHERE o.status IN ('failed', 'plan_failed') ORDER BY o.recorded_ms DESC,"
            " o.rowid DESC", {"run": run_id}).fetchall()
        external = journal.execute(
            "SELECT count(*), count(DISTINCT o.event_id) FROM emitted_events x LEFT JOIN"
            " (SELECT DISTINCT event_id FROM outcomes) o USING(event_id) WHERE x.run_id=?",
            (run_id,)).fetchone()
        pending = _pending_tasks(journal, run_id)
    finally:
        journal.close()
    store = read_only(root / "trinity_patterns.db")
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
    if external[0]:
        figures["EXTERNAL EVENTS"] = (f"{external[0]:,} from trinity emit, {external[1]:,} "
                                      "with an outcome")
    for task_id, product in failed[:5]:
        figures[(f"FAILED ({len(failed):,}, latest first)", task_id)] = _why(product)[:60]
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


def _why(product: str | None) -> str:
    """A failed outcome's reason as the dashboard shows it: EXECUTOR's recorded error, or
    ARCHITECT's text, on one line."""
    try:
        body = json.loads(product or "")
    except ValueError:
        body = None
    text = body["error"] if isinstance(body, dict) and "error" in body else product or ""
    return " ".join(text.split()) or "no reason recorded"


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
    journal = read_only(root / "trinity_messages.db")
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
    conn = read_only(root / "trinity_messages.db")
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


def invoke(root: Path, *args: str) -> Any:
    env = {"TRINITY_DATA_DIR": str(root), "COLUMNS": "200"}
    return CliRunner().invoke(dashboard_command, list(args), env=env)


def assert_clear(result: Any, code: int, *phrases: str) -> None:
    """Exit ``code``, each phrase in the output, and no traceback (CliRunner catches any
    exception but SystemExit, which is how click ends a command)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output
