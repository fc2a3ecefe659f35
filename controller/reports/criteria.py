"""The plan's success criteria, each measured from a run's recorded data.

Mandatory (all must pass): zero crashes, every event classified, patterns persisted
across the restart, every model call in the ledger, memory under 500 MB per process
throughout, no unbounded queue backlog. Performance (target > 90 % of them): detection
accuracy, detection latency, pattern confidence, local model share, learning.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trinity import measures, plan
from trinity.contract import ARCHITECT, EXECUTOR, WITNESS
from trinity.controller.reports import persistence
from trinity.db import reading
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import patterns as pattern_store
from trinity.stores.run_logs import (
    AFTER_RESTART,
    ALERTS_LOG,
    read_alerts,
    read_json,
    read_snapshots,
    write_json,
)

# An unexpected exit, or an agent given up: by supervisord (too many failed starts) or by
# the controller (hung more often than its restart intensity allows).
CRASH_KINDS = ("agent_crashed", "agent_fatal", "restart_intensity_exceeded")
# Alerts journaled just before a process is stopped on purpose, naming its pid: the
# chaos monkey's kills and stops, the controller's restart of a hung agent.
DELIBERATE_KINDS = ("chaos_kill", "chaos_stop", "agent_restarted")


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
    write_json(settings.log_dir / AFTER_RESTART,
               {"run_id": state["run_id"] if state else None, "problems": problems,
                "state": state}, durable=True)


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

    return [a for a in read_alerts(log_dir / ALERTS_LOG) if belongs(a)]


def evaluate(settings: Settings, run_id: str | None = None) -> tuple[runs.Run, list[Criterion]]:
    """Every criterion for ``run_id`` (default: the latest run)."""
    with reading(settings.messages_db) as journal:
        run = runs.get_run(journal, run_id) if run_id else runs.latest_run(journal)
        if run is None:
            raise sqlite3.DatabaseError(f"no run {run_id or ''} in {settings.messages_db.name}")
        emitted = runs.events(journal, run.run_id)
        outcomes = runs.outcomes(journal, run.run_id)
    events = {e.event_id: (e.category, e.sim_elapsed_s) for e in emitted}
    emitted_ms = {e.event_id: e.emitted_ms for e in emitted}
    decisions: dict[str, pattern_store.Decision] = {}
    trend_rows: list[float] = []
    if settings.patterns_db.exists():
        with reading(settings.patterns_db) as conn:
            decisions = pattern_store.run_decisions(conn, run.run_id)
            trend_rows = pattern_store.confidences(conn, run_id=run.run_id)
    calls: list[dict[str, Any]] = []
    if settings.costs_db.exists():
        with reading(settings.costs_db) as conn:
            calls = costs.calls(conn, run.run_id)
    alerts = run_alerts(settings.log_dir, run, run.ended_ms)
    samples = list(read_snapshots(settings.log_dir, "metrics", run.run_id)[0].values())
    found: list[Criterion] = []

    crashes = unexpected_exits(alerts)
    deliberate = sum(a.get("kind") in CRASH_KINDS for a in alerts) - len(crashes)
    given_up = sum(a.get("kind") != "agent_crashed" for a in crashes)
    found.append(Criterion(plan.ZERO_CRASHES.name, True, plan.ZERO_CRASHES.text,
                           f"{len(crashes) - given_up} unexpected exits" + (
                               f", {given_up} agents given up" if given_up else "") + (
                               f" ({deliberate} deliberate kills not counted)"
                               if deliberate else ""), not crashes, len(crashes)))

    classified = sum(e in decisions for e in events)
    found.append(Criterion(
        plan.EVENT_DETECTION.name, True, plan.EVENT_DETECTION.text.format(events=len(events)),
        f"{classified} of {len(events)} classified", bool(events) and classified == len(events),
        classified))

    after = _persistence_result(settings, run.run_id)
    found.append(Criterion(plan.PATTERN_PERSISTENCE.name, True, plan.PATTERN_PERSISTENCE.text,
                           after[0], after[1]))

    architect_events = {c["event_id"] for c in calls if c["agent"] == ARCHITECT}
    executor_tasks = {c["task_id"] for c in calls if c["agent"] == EXECUTOR}
    untracked = [o.task_id for o in outcomes
                 if (o.delegate == ARCHITECT and o.event_id not in architect_events)
                 or (o.delegate not in (ARCHITECT, WITNESS) and o.task_id not in executor_tasks)]
    planned = {o.event_id for o in outcomes if o.delegate != WITNESS}
    untracked += [e for e in planned if e not in architect_events]
    model_outcomes = sum(o.delegate != WITNESS for o in outcomes)
    found.append(Criterion(
        plan.COST_TRACKING.name, True, plan.COST_TRACKING.text,
        f"{len(calls)} calls recorded; {len(untracked)} model outcomes without a ledger row "
        f"(of {model_outcomes})", not untracked, len(untracked)))

    peak = max((s.get("memory_max_process_rss_mb", 0.0) for s in samples), default=None)
    found.append(Criterion(
        plan.MEMORY_STABILITY.name, True, plan.MEMORY_STABILITY.text,
        "no metrics sample" if peak is None else
        f"peak {peak:.0f} MB RSS over {len(samples)} samples",
        plan.MEMORY_STABILITY.met(peak), peak))

    backlog = max((max(s.get("queues", {}).values(), default=0) for s in samples), default=None)
    found.append(Criterion(
        plan.QUEUE_HEALTH.name, True, plan.QUEUE_HEALTH.text,
        "no metrics sample" if backlog is None else f"max backlog {backlog}",
        plan.QUEUE_HEALTH.met(backlog), backlog))

    scores = measures.detection_scores(
        events, {e: (d.pattern, d.confidence) for e, d in decisions.items()})
    accuracy = scores["accuracy"]
    found.append(Criterion(
        plan.DETECTION_ACCURACY.name, False, plan.DETECTION_ACCURACY.text,
        "-" if accuracy is None else f"{accuracy:.1%} ({scores['correct']} of "
        f"{scores['events_classified']})", plan.DETECTION_ACCURACY.met(accuracy), accuracy))
    latencies = [(decisions[e].detected_ms - emitted_ms[e]) / 1000 for e in events
                 if e in decisions and e in emitted_ms]
    # fsum: exactly rounded whatever the order, so every reader of the records (a report
    # of the same run, an export summed elsewhere) gets the same average to the last bit,
    # and the figure printed to two places never flips at a rounding edge.
    latency = math.fsum(latencies) / len(latencies) if latencies else None
    found.append(Criterion(
        plan.DETECTION_LATENCY.name, False, plan.DETECTION_LATENCY.text,
        "-" if latency is None else f"{latency:.2f} s average (emit to detection)",
        plan.DETECTION_LATENCY.met(latency), latency))
    confidences = [d.confidence for d in decisions.values() if d.pattern is not None]
    avg_conf = math.fsum(confidences) / len(confidences) if confidences else None
    found.append(Criterion(
        plan.PATTERN_CONFIDENCE.name, False, plan.PATTERN_CONFIDENCE.text,
        "-" if avg_conf is None else f"{avg_conf:.3f} average over {len(confidences)}",
        plan.PATTERN_CONFIDENCE.met(avg_conf), avg_conf))
    local = sum(bool(c["local"]) for c in calls) / len(calls) if calls else None
    found.append(Criterion(
        plan.COST_EFFICIENCY.name, False, plan.COST_EFFICIENCY.text,
        "-" if local is None else f"{local:.1%} of {len(calls)} calls local",
        plan.COST_EFFICIENCY.met(local), local))
    trend = measures.half_trend(trend_rows)
    found.append(Criterion(
        plan.LEARNING_IMPROVEMENT.name, False, plan.LEARNING_IMPROVEMENT.text,
        "-" if trend is None else f"{trend:+.3f} (later half minus earlier half)",
        plan.LEARNING_IMPROVEMENT.met(trend), trend))
    return run, found


def _persistence_result(settings: Settings, run_id: str) -> tuple[str, bool]:
    result = read_json(settings.log_dir / AFTER_RESTART)
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
