"""The plan's success criteria, each measured from a run's recorded data.

Mandatory (all must pass): zero crashes, every event classified, patterns persisted
across the restart, every model call in the ledger, memory under 500 MB per process
throughout, no unbounded queue backlog. Performance (target > 90 % of them): detection
accuracy, detection latency, pattern confidence, local model share, learning.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trinity.controller import persistence, runs
from trinity.controller.alerts import read_alerts
from trinity.controller.rules import BACKLOG_LIMIT, MEMORY_LIMIT_MB
from trinity.controller.snapshots import (
    detection_scores,
    open_readonly,
    read_snapshots,
    run_events,
)
from trinity.settings import Settings

# An unexpected exit, or an agent given up: by supervisord (too many failed starts) or by
# the controller (hung more often than its restart intensity allows).
CRASH_KINDS = ("agent_crashed", "agent_fatal", "restart_intensity_exceeded")
# Alerts journaled just before a process is stopped on purpose, naming its pid: the
# chaos monkey's kills and stops, the controller's restart of a hung agent.
DELIBERATE_KINDS = ("chaos_kill", "chaos_stop", "agent_restarted")
AFTER_FILE = "persistence_after.json"


@dataclass(frozen=True)
class Criterion:
    name: str
    mandatory: bool
    target: str
    measured: str
    passed: bool
    value: float | int | None = None


def save_after(settings: Settings, problems: list[str], state: dict[str, Any] | None) -> None:
    """The result of the persistence check that followed a kill-and-resume."""
    path = settings.log_dir / AFTER_FILE
    path.write_text(json.dumps({"run_id": state["run_id"] if state else None,
                                "problems": problems, "state": state}, indent=2) + "\n",
                    encoding="utf-8")


def _pid_of(alert: dict[str, Any]) -> str | None:
    details = alert.get("details")
    pid = details.get("pid") if isinstance(details, dict) else None
    return None if pid is None else str(pid)


def unexpected_exits(alerts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Crash alerts, but for the exits of processes stopped on purpose: an exit alert
    naming the agent and pid of a deliberate kill's alert was expected. supervisord
    giving up on a program (``agent_fatal``, ``restart_intensity_exceeded``) is never
    expected."""
    deliberate = {(a.get("agent"), _pid_of(a)) for a in alerts
                  if a.get("kind") in DELIBERATE_KINDS and _pid_of(a) is not None}
    return [a for a in alerts if a.get("kind") in CRASH_KINDS and not (
        a.get("kind") == "agent_crashed" and (a.get("agent"), _pid_of(a)) in deliberate)]


def run_alerts(log_dir: Path, run: runs.Run, ended_ms: int | None) -> list[dict[str, Any]]:
    """Alerts of the run: tagged with it, or (crash alerts come from supervisord's listener,
    which knows no run) raised while it was running."""
    def belongs(alert: dict[str, Any]) -> bool:
        if alert.get("run_id") is not None:
            return bool(alert["run_id"] == run.run_id)
        ts = alert.get("ts_ms")
        return isinstance(ts, int) and run.started_ms <= ts <= (ended_ms or ts)

    return [a for a in read_alerts(log_dir / "alerts.log") if belongs(a)]


def evaluate(settings: Settings, run_id: str | None = None) -> tuple[runs.Run, list[Criterion]]:
    """Every criterion for ``run_id`` (default: the latest run)."""
    journal = open_readonly(settings.messages_db)
    try:
        run = runs.get_run(journal, run_id) if run_id else runs.latest_run_readonly(journal)
        if run is None:
            raise sqlite3.DatabaseError(f"no run {run_id or ''} in {settings.messages_db.name}")
        ended_ms = journal.execute("SELECT ended_ms FROM runs WHERE run_id=?",
                                   (run.run_id,)).fetchone()[0]
        events = run_events(journal, run.run_id)
        emitted_ms = dict(journal.execute(
            "SELECT event_id, emitted_ms FROM events WHERE run_id=?", (run.run_id,)).fetchall())
        outcomes = journal.execute(
            "SELECT o.task_id, o.event_id, o.delegate FROM outcomes o JOIN events e"
            " USING(event_id) WHERE e.run_id=?", (run.run_id,)).fetchall()
    finally:
        journal.close()
    detections: dict[str, tuple[str | None, float, int]] = {}
    if settings.patterns_db.exists():
        conn = open_readonly(settings.patterns_db)
        try:
            detections = {e: (p, float(c), int(t)) for e, p, c, t in conn.execute(
                "SELECT event_id, pattern, confidence, detected_ms FROM detections"
                " WHERE run_id=?", (run.run_id,))}
            trend_rows = [float(c) for (c,) in conn.execute(
                "SELECT confidence FROM detections WHERE run_id=? AND pattern IS NOT NULL"
                " ORDER BY detected_ms", (run.run_id,))]
        finally:
            conn.close()
    else:
        trend_rows = []
    calls: list[tuple[str, str | None, str | None, int]] = []
    if settings.costs_db.exists():
        conn = open_readonly(settings.costs_db)
        try:
            calls = conn.execute("SELECT agent, event_id, task_id, local FROM calls"
                                 " WHERE run_id=?", (run.run_id,)).fetchall()
        finally:
            conn.close()
    alerts = run_alerts(settings.log_dir, run, ended_ms)
    samples = list(read_snapshots(settings.log_dir, "metrics", run.run_id)[0].values())
    found: list[Criterion] = []

    crashes = unexpected_exits(alerts)
    deliberate = sum(a.get("kind") in CRASH_KINDS for a in alerts) - len(crashes)
    given_up = sum(a.get("kind") != "agent_crashed" for a in crashes)
    found.append(Criterion("Zero Crashes", True, "0 unexpected exits",
                           f"{len(crashes) - given_up} unexpected exits" + (
                               f", {given_up} agents given up" if given_up else "") + (
                               f" ({deliberate} deliberate kills not counted)"
                               if deliberate else ""), not crashes, len(crashes)))

    classified = sum(e in detections for e in events)
    found.append(Criterion(
        "100% Event Detection", True, f"all {len(events)} events classified",
        f"{classified} of {len(events)} classified", bool(events) and classified == len(events),
        classified))

    after = _persistence_result(settings, run.run_id)
    found.append(Criterion("Pattern Persistence", True, "all patterns in DB after restart",
                           after[0], after[1]))

    architect_events = {e for agent, e, _, _ in calls if agent == "architect"}
    executor_tasks = {t for agent, _, t, _ in calls if agent == "executor"}
    untracked = [t for t, e, d in outcomes
                 if (d == "architect" and e not in architect_events)
                 or (d not in ("architect", "witness") and t not in executor_tasks)]
    planned = {e for _, e, d in outcomes if d not in ("witness",)}
    untracked += [e for e in planned if e not in architect_events]
    model_outcomes = sum(d != "witness" for _, _, d in outcomes)
    found.append(Criterion(
        "Cost Tracking", True, "100% of model calls in the ledger",
        f"{len(calls)} calls recorded; {len(untracked)} model outcomes without a ledger row "
        f"(of {model_outcomes})", not untracked, len(untracked)))

    peak = max((s.get("memory_max_process_rss_mb", 0.0) for s in samples), default=None)
    found.append(Criterion(
        "Memory Stability", True, f"< {MEMORY_LIMIT_MB:.0f} MB per process throughout",
        "no metrics sample" if peak is None else
        f"peak {peak:.0f} MB RSS over {len(samples)} samples",
        peak is not None and peak < MEMORY_LIMIT_MB, peak))

    backlog = max((max(s.get("queues", {}).values(), default=0) for s in samples), default=None)
    found.append(Criterion(
        "Queue Health", True, f"no backlog above {BACKLOG_LIMIT}",
        "no metrics sample" if backlog is None else f"max backlog {backlog}",
        backlog is not None and backlog <= BACKLOG_LIMIT, backlog))

    scores = detection_scores(events, {e: (p, c) for e, (p, c, _) in detections.items()})
    accuracy = scores["accuracy"]
    found.append(Criterion(
        "Detection Accuracy", False, "> 90% correct classification",
        "-" if accuracy is None else f"{accuracy:.1%} ({scores['correct']} of "
        f"{scores['events_classified']})", accuracy is not None and accuracy > 0.9, accuracy))
    latencies = [(detections[e][2] - emitted_ms[e]) / 1000 for e in events
                 if e in detections and e in emitted_ms]
    latency = sum(latencies) / len(latencies) if latencies else None
    found.append(Criterion(
        "Detection Latency", False, "< 2 s average",
        "-" if latency is None else f"{latency:.2f} s average (emit to detection)",
        latency is not None and latency < 2.0, latency))
    confidences = [c for p, c, _ in detections.values() if p is not None]
    avg_conf = sum(confidences) / len(confidences) if confidences else None
    found.append(Criterion(
        "Pattern Confidence", False, "> 0.75 average",
        "-" if avg_conf is None else f"{avg_conf:.3f} average over {len(confidences)}",
        avg_conf is not None and avg_conf > 0.75, avg_conf))
    local = sum(bool(r[3]) for r in calls) / len(calls) if calls else None
    found.append(Criterion(
        "Cost Efficiency", False, "> 70% local model usage",
        "-" if local is None else f"{local:.1%} of {len(calls)} calls local",
        local is not None and local > 0.7, local))
    half = len(trend_rows) // 2
    trend = (sum(trend_rows[half:]) / (len(trend_rows) - half)
             - sum(trend_rows[:half]) / half) if half else None
    found.append(Criterion(
        "Learning Improvement", False, "confidence increases over time",
        "-" if trend is None else f"{trend:+.3f} (later half minus earlier half)",
        trend is not None and trend > 0, trend))
    return run, found


def _persistence_result(settings: Settings, run_id: str) -> tuple[str, bool]:
    try:
        result = json.loads((settings.log_dir / AFTER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = None
    if result is not None and result.get("run_id") == run_id:
        problems = result.get("problems") or []
        return ("restored after the restart" if not problems
                else f"{len(problems)} problems after the restart: {problems[0]}"), not problems
    _, problems = persistence.validate(settings)
    return ("no kill-and-resume in this run; stores consistent" if not problems
            else f"{len(problems)} problems: {problems[0]}"), not problems


def as_dicts(criteria: list[Criterion]) -> list[dict[str, Any]]:
    return [asdict(c) for c in criteria]


def format_table(criteria: list[Criterion]) -> list[str]:
    lines = []
    for kind, mandatory in (("Mandatory", True), ("Performance", False)):
        lines.append(f"{kind} criteria:")
        for c in (c for c in criteria if c.mandatory is mandatory):
            lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<22} {c.measured}"
                         f"  (target: {c.target})")
    return lines


def mandatory_passed(criteria: list[Criterion]) -> bool:
    return all(c.passed for c in criteria if c.mandatory)
