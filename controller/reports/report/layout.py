"""The report as a list of blocks, the same content for Markdown and HTML.

A ``Block`` is one heading, paragraph, bullet or numbered list, table or image;
``document`` lays a ``ReportData`` and its drawn charts out as the report's sections
(summary, criteria, performance, cost, failed tasks and external events when there are
any, charts, incidents, recommendations, conclusion, data gaps and a closing line naming
the records used), so both renderings carry the
same text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from trinity import measures
from trinity.contract import FAILED_STATUSES, PATTERNS
from trinity.contract import NONE as NOISE
from trinity.controller.reports import charts
from trinity.controller.reports.report.data import ReportData
from trinity.controller.reports.report.recommend import (
    _duration,
    _pct,
    _seconds,
    _usd,
    _when,
    conclusion,
    incidents,
    recommendations,
)


@dataclass(frozen=True)
class Block:
    """One piece of the report: heading (level 1-3), paragraph, bullets, numbered list,
    table (first row the header) or image."""

    kind: str
    text: str = ""
    level: int = 2
    items: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: Path | None = None


def _h(text: str, level: int = 2) -> Block:
    return Block("heading", text, level)


def _ul(items: Sequence[str]) -> Block:
    return Block("bullets", items=tuple(items))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Block:
    return Block("table", rows=(tuple(header), *(tuple(r) for r in rows)))


def _summary(data: ReportData) -> list[Block]:
    run = data.run
    ended = data.ended_ms
    real_s = ((ended or data.run.started_ms) - run.started_ms) / 1000
    mark = "✓" if data.status == "PASSED" else "✗"
    failed = f" (failed: {', '.join(data.failed_mandatory)})" if data.failed_mandatory else ""
    return [_h("Test Summary"), _ul([
        f"Run: {run.run_id} ({run.status}, time scale {run.time_scale:g})",
        f"Start: {_when(run.started_ms)}",
        f"End: {_when(ended)}" if ended else f"End: not ended (run {run.status})",
        f"Duration: {_duration(real_s)} real, {_duration(run.sim_elapsed_s)} simulated "
        f"of {_duration(run.duration_s)} planned",
        f"Events: {len(data.events)} emitted of {run.total_events} planned, "
        f"{data.scores['events_classified']} classified, {data.outcomes} with an outcome",
        *_external_line(data),
        f"Outcomes: {_statuses(data.outcome_statuses)}",
        f"Status: {data.status} {mark}{failed}",
    ])]


def _statuses(counted: dict[str, int]) -> str:
    """Every outcome status with its count, the failed ones first."""
    if not counted:
        return "none recorded"
    failed = [s for s in FAILED_STATUSES if counted.get(s)]
    rest = sorted(s for s in counted if s not in FAILED_STATUSES)
    return ", ".join(f"{counted[s]} {s}" for s in (*failed, *rest))


def _external_line(data: ReportData) -> list[str]:
    if not data.external:
        return []
    classified = [e for e in data.external if e.detected]
    given = sum(e.pattern is not None for e in classified)
    answered = sum(bool(e.outcomes) for e in data.external)
    return [f"External events (trinity emit, no ground truth): {len(data.external)} arrived "
            f"during the run, {len(classified)} classified ({given} given a pattern), "
            f"{answered} with an outcome"]


def _failed_blocks(data: ReportData) -> list[Block]:
    """Every plan and task that failed, with the reason it recorded."""
    if not data.failed:
        return []
    return [_h("Failed Tasks"), _ul([
        f"{len(data.failed)} failed: "
        f"{_statuses(dict(Counter(f.status for f in data.failed)))}"]),
        _table(("Task", "Event", "Agent", "Status", "Reason"),
               [(f.task_id, f.event_id + (" (external)" if f.external else ""),
                 f.delegate.upper(), f.status, f.reason) for f in data.failed])]


def _external_blocks(data: ReportData) -> list[Block]:
    """The external events with WITNESS's decision and their outcomes."""
    if not data.external:
        return []
    return [_h("External Events"), _table(
        ("Event", "Arrived (sim h)", "Detected", "Confidence", "Outcomes"),
        [(e.event_id, f"{e.sim_h:.2f}",
          (e.pattern or "no pattern") if e.detected else "not classified yet",
          "-" if e.confidence is None else f"{e.confidence:.3f}",
          ", ".join(e.outcomes) or "-") for e in data.external])]


def _criteria_blocks(data: ReportData) -> list[Block]:
    blocks = [_h("Success Criteria Results")]
    for title, mandatory in (("Mandatory criteria (all must pass)", True),
                             ("Performance criteria", False)):
        blocks += [_h(title, 3), _table(
            ("Result", "Criterion", "Measured", "Target"),
            [("✓ PASS" if c.passed else "✗ FAIL", c.name, c.measured, c.target)
             for c in data.criteria if c.mandatory is mandatory])]
    return blocks


def _performance(data: ReportData) -> list[Block]:
    scores = data.scores
    own = [e.witness_ms for e in data.events if e.witness_ms is not None]
    latency = data.criterion("Detection Latency").value
    conf = data.criterion("Pattern Confidence").value
    trend = data.criterion("Learning Improvement").value
    rows = []
    noise = any(e.truth == NOISE for e in data.events)
    for category in (*PATTERNS, NOISE) if noise else PATTERNS:
        mine = [e for e in data.events if e.truth == category]
        classified = [e for e in mine if e.detected]
        correct = [e for e in classified if e.correct]
        confs = [e.confidence for e in correct if e.confidence is not None and e.pattern]
        rows.append((category, str(len(mine)), str(len(classified)), str(len(correct)),
                     _pct(len(correct) / len(classified) if classified else None),
                     f"{math.fsum(confs) / len(confs):.3f}" if confs else "-"))
    return [_h("Performance Metrics"), _ul([
        f"Detection accuracy: {_pct(scores['accuracy'])} ({scores['correct']} of "
        f"{scores['events_classified']} classified events correct against the scenario's "
        "ground truth)",
        f"Detection rate: {_pct(scores['detection_rate'])} ({scores['detected']} of "
        f"{scores['pattern_events_classified']} pattern events given a pattern); "
        f"{scores['false_positives']} of {scores['noise_events_classified']} noise events "
        "given one",
        f"Detection latency: {_seconds(None if latency is None else float(latency))} average, "
        f"{_seconds(data.latency_p95_s)} p95, {_seconds(max(data.latencies_s, default=None))} "
        f"max over {len(data.latencies_s)} events (emitted to detected, real time); WITNESS's "
        f"own processing {f'{sum(own) / len(own):.0f} ms' if own else '-'} average",
        f"Pattern confidence: {'-' if conf is None else f'{float(conf):.3f}'} average",
        f"Cost efficiency: {_pct(data.costs['local_share_calls'])} of model calls local, "
        f"{_pct(data.costs['local_share_tokens'])} of tokens",
        f"Learning improvement: {'-' if trend is None else f'{float(trend):+.3f}'} confidence "
        "trend (later half of the run's detections minus earlier half)",
        f"Corrections by people (in the pattern store, all runs): "
        f"{measures.corrections_line(data.corrections)}",
    ]), _h("By category", 3), _table(
        ("Category", "Events", "Classified", "Correct", "Accuracy", "Avg confidence"), rows)]


def _cost_blocks(data: ReportData) -> list[Block]:
    costs = data.costs
    total = float(costs["total_cost_usd"])
    by_agent = costs["by_agent"]
    agent_rows = [(agent.upper(), str(by_agent.get(agent, {}).get("calls", 0)),
                   _usd(by_agent.get(agent, {}).get("cost_usd", 0.0)), _pct(share))
                  for agent, share in data.local_share_by_agent.items()]
    model_rows = [(model, str(g["calls"]), f"{g['input_tokens']:,}", f"{g['output_tokens']:,}",
                   _usd(g["cost_usd"])) for model, g in costs["by_model"].items()]
    budget = (f" / {_usd(data.budget_usd)} budget ({total / data.budget_usd:.1%})"
              if data.budget_usd else "")
    return [_h("Cost Analysis"), _ul([
        f"Total cost: {_usd(total)}{budget}",
        f"Model calls: {costs['total_calls']} attempts for {costs['requests']} requests, "
        f"success rate {_pct(costs['success_rate'])} ({costs['by_status']['success']} success, "
        f"{costs['by_status']['error']} error, {costs['by_status']['timeout']} timeout)",
        f"Tokens: {costs['input_tokens']:,} in, {costs['output_tokens']:,} out",
        f"Highest cost in one simulated hour: {_usd(data.max_hourly_cost_usd)} (hourly cost "
        "snapshots)",
    ]), _h("By agent", 3), _table(("Agent", "Calls", "Cost", "Local share"), agent_rows),
        _h("By model", 3),
        _table(("Model", "Calls", "Input tokens", "Output tokens", "Cost"), model_rows)]


def document(data: ReportData, drawn: Sequence[charts.Chart]) -> list[Block]:
    blocks = [_h("24-Hour Autonomous Operation Test Report", 1)]
    blocks += _summary(data) + _criteria_blocks(data) + _performance(data) + _cost_blocks(data)
    blocks += _failed_blocks(data) + _external_blocks(data)
    blocks.append(_h("Charts"))
    for chart in drawn:
        blocks.append(Block("image", chart.title + (f" ({chart.note})" if chart.note else ""),
                            path=chart.path))
    blocks += [_h("Incidents"), _ul(incidents(data) or ["No alert, misclassified event or "
                                                        "memory peak was recorded."])]
    blocks += [_h("Recommendations"), Block("numbered", items=tuple(recommendations(data)))]
    blocks += [_h("Conclusion"), Block("paragraph", conclusion(data))]
    if data.gaps:
        blocks += [_h("Data gaps"), _ul(data.gaps)]
    counts = ", ".join(f"{n} {kind}" for kind, n in data.snapshot_counts.items())
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    blocks.append(Block("paragraph", f"Generated {_when(now_ms)} from the stores in "
                        f"{data.data_dir} and the logs in {data.log_dir} ({counts} snapshots, "
                        f"{len(data.alerts)} alerts)."))
    return blocks
