"""What the figures say: the incidents, recommendations and conclusion of a report.

Formatting helpers (percentages, dollars, seconds, timestamps, durations, one line per
event or alert) shared with the layout, then ``incidents`` (the run's alerts, every event
not classified as its ground truth, a memory peak near the limit), the ``_rec_*`` rules
that ``recommendations`` applies to the measurements (each recommendation quotes the
figures that triggered it) and the one-paragraph ``conclusion``. Everything here is a
pure function of a ``ReportData``; the targets come from ``trinity.plan``.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from trinity.contract import NONE as NOISE
from trinity.contract import PATTERNS
from trinity.controller.reports import criteria
from trinity.controller.reports.report.data import EventResult, ReportData
from trinity.plan import (
    ACCURACY_TARGET,
    BACKLOG_LIMIT,
    COST_PER_24H_USD,
    LATENCY_TARGET_S,
    LOCAL_SHARE_TARGET,
    MEMORY_GROWTH_PCT_PER_HOUR,
    MEMORY_LIMIT_MB,
)

# A memory sample above this share of the per-process limit is an incident.
MEMORY_WARN_SHARE = 0.8


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.4f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    total = max(0, int(round(seconds)))
    return f"{total // 3600}h {total % 3600 // 60:02d}m {total % 60:02d}s"


def _event_name(event: EventResult) -> str:
    what = "noise" if event.truth == NOISE else event.truth
    extra = f" #{event.noise}" if event.noise else ""
    return f"hour {event.sim_h:.2f}, cycle {event.cycle}{extra}: {what} event"


def _miss(event: EventResult) -> str:
    if not event.detected:
        return f"{_event_name(event)} has no detection recorded"
    conf = f"confidence {event.confidence:.2f}" if event.confidence is not None else ""
    if event.pattern is None:
        return (f"false negative: {_event_name(event)} was given no pattern "
                f"(closest label {event.label}, {conf})")
    kind = "false positive" if event.truth == NOISE else "misclassified"
    return f"{kind}: {_event_name(event)} detected as {event.pattern} ({conf})"


def _alert_line(alert: dict[str, Any]) -> str:
    sim = alert.get("sim_elapsed_s")
    at = f" (hour {sim / 3600:.2f})" if isinstance(sim, int | float) else ""
    agent = f" [{alert['agent']}]" if alert.get("agent") else ""
    return (f"{alert.get('ts', '?')}{at} {alert.get('severity', '?')} "
            f"{alert.get('kind', '?')}{agent}: {alert.get('message', '')}")


def incidents(data: ReportData) -> list[str]:
    """The run's alerts, every event not classified as its ground truth, and memory
    samples above ``MEMORY_WARN_SHARE`` of the limit."""
    found = [_alert_line(a) for a in sorted(data.alerts, key=lambda a: a.get("ts_ms") or 0)]
    found += [_miss(e) for e in data.events if not e.correct]
    if data.memory_peak and data.memory_peak[0] >= MEMORY_WARN_SHARE * MEMORY_LIMIT_MB:
        mb, process, hour = data.memory_peak
        found.append(f"memory peak {mb:.0f} MB RSS in {process} at hour {hour:.2f} "
                     f"({mb / MEMORY_LIMIT_MB:.0%} of the {MEMORY_LIMIT_MB:.0f} MB limit)")
    return found


def _counted(counter: Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counter.most_common())


def _rec_mandatory(data: ReportData) -> list[str]:
    found = []
    for c in data.criteria:
        if c.mandatory and not c.passed:
            found.append(f"Fix {c.name}: measured {c.measured} against the target {c.target}.")
    crashes = Counter(str(a.get("agent") or "?") for a in criteria.unexpected_exits(data.alerts))
    if crashes:
        fatal = sum(a.get("kind") == "agent_fatal" for a in data.alerts)
        found.append(f"Investigate the unexpected exits ({_counted(crashes)}; supervisord gave "
                     f"up {fatal} times): read their alerts and the programs' stderr logs.")
    return found


def _rec_categories(data: ReportData) -> list[str]:
    found = []
    for category in PATTERNS:
        mine = [e for e in data.events if e.truth == category and e.detected]
        missed = [e for e in mine if not e.correct]
        if not mine or len(mine) - len(missed) >= ACCURACY_TARGET * len(mine):
            continue
        recall = f"{len(mine) - len(missed)} of {len(mine)} correct"
        abstained = [e for e in missed if e.pattern is None and e.label == category]
        if len(abstained) == len(missed):
            confs = sorted(e.confidence or 0.0 for e in abstained)
            found.append(f"Lower the {category} threshold: {recall}; every miss was an "
                         f"abstention with {category} as the closest label (confidence "
                         f"{confs[0]:.2f}-{confs[-1]:.2f}).")
            continue
        given = Counter(e.pattern or "no pattern" for e in missed)
        found.append(f"Improve {category} detection: {recall}; given instead: "
                     f"{_counted(given)}. Add exemplars of the missed wordings.")
    return found


def _rec_noise(data: ReportData) -> list[str]:
    wrong = Counter(e.pattern for e in data.events
                    if e.truth == NOISE and e.pattern is not None)
    noise = sum(e.truth == NOISE and e.detected for e in data.events)
    if not wrong:
        return []
    return [f"Cut false positives: {sum(wrong.values())} of {noise} noise events were given a "
            f"pattern ({_counted(Counter({str(k): v for k, v in wrong.items()}))}); raise "
            "those patterns' thresholds or add noise exemplars."]


def _rec_latency(data: ReportData) -> list[str]:
    average = data.criterion("Detection Latency").value
    p95 = data.latency_p95_s
    if p95 is None or average is None or max(float(average), p95) < LATENCY_TARGET_S:
        return []
    slow = sorted((e for e in data.events if (e.latency_s or 0.0) >= LATENCY_TARGET_S),
                  key=lambda e: -(e.latency_s or 0.0))
    starts_h = [0.0] + [a["sim_elapsed_s"] / 3600 for a in data.alerts
                        if a.get("kind") == "deliberate_restart"
                        and isinstance(a.get("sim_elapsed_s"), int | float)]
    window_h = 2 * data.run.event_interval_s / 3600
    after_start = [e for e in slow if any(0 <= e.sim_h - h <= window_h for h in starts_h)]
    text = (f"Reduce detection latency: average {float(average):.2f} s, p95 {p95:.2f} s against "
            f"the {LATENCY_TARGET_S:g} s target; {len(slow)} events took {LATENCY_TARGET_S:g} s "
            "or more, the slowest " + ", ".join(
                f"cycle {e.cycle} at hour {e.sim_h:.2f} ({e.latency_s:.2f} s)" for e in slow[:3])
            + ".")
    if slow and len(after_start) == len(slow):
        text += (" All of them came within two event intervals of the run's start or a "
                 "restart (hours " + ", ".join(f"{h:.2f}" for h in starts_h) + "): WITNESS's "
                 "start-up, not its steady state, is what to speed up.")
    own = [e.witness_ms for e in data.events if e.witness_ms is not None]
    if own:
        own_s = sum(own) / len(own) / 1000
        text += (f" WITNESS's own processing averages {own_s:.3f} s per event; the rest is "
                 "time before it takes the event up." if own_s < float(average) / 2 else
                 f" WITNESS's own processing averages {own_s:.3f} s per event: make the "
                 "detector faster.")
    return [text]


def _rec_memory(data: ReportData) -> list[str]:
    found = []
    if data.memory_peak and data.memory_peak[0] >= MEMORY_WARN_SHARE * MEMORY_LIMIT_MB:
        mb, process, hour = data.memory_peak
        found.append(f"Investigate the memory peak of {mb:.0f} MB in {process} at hour "
                     f"{hour:.2f} (limit {MEMORY_LIMIT_MB:.0f} MB per process).")
    growth = data.last_memory_growth_pct
    if growth is not None and growth > MEMORY_GROWTH_PCT_PER_HOUR:
        found.append(f"Look for a leak: memory grew {growth:.1f} % per hour at the end of "
                     f"the run (alert threshold {MEMORY_GROWTH_PCT_PER_HOUR:g} %).")
    return found


def _rec_backlog(data: ReportData) -> list[str]:
    peak = data.backlog_peak
    if peak is None or not BACKLOG_LIMIT / 2 < peak[0] <= BACKLOG_LIMIT:
        return []
    return [f"Watch the {peak[1]} backlog: it reached {peak[0]} messages at hour "
            f"{peak[2]:.2f}, more than half of the {BACKLOG_LIMIT} limit; its consumer needs "
            "more throughput."]


def _rec_cost(data: ReportData) -> list[str]:
    found = []
    local = data.criterion("Cost Efficiency").value
    shares = {a: s for a, s in data.local_share_by_agent.items() if s is not None}
    if local is not None and float(local) <= LOCAL_SHARE_TARGET and shares:
        agent = min(shares, key=lambda a: shares[a])
        found.append(f"Increase local model usage for {agent.upper()}: {shares[agent]:.0%} of "
                     f"its calls were local ({float(local):.0%} overall, target > "
                     f"{LOCAL_SHARE_TARGET:.0%}).")
    total = float(data.costs["total_cost_usd"])
    hours = float(data.run.config.get("duration_h") or 0)
    if hours and total * 24 / hours > COST_PER_24H_USD:
        found.append(f"Cut cost: {_usd(total)} over {hours:g} simulated hours is "
                     f"{_usd(total * 24 / hours)} per 24 h, above the plan's "
                     f"{_usd(COST_PER_24H_USD)} goal.")
    if data.budget_usd and total >= 0.5 * data.budget_usd:
        found.append(f"Review the budget: {_usd(total)} spent, {total / data.budget_usd:.0%} "
                     f"of {_usd(data.budget_usd)}.")
    rate = data.costs["success_rate"]
    if rate is not None and rate < 0.95:
        found.append(f"Check the model providers: {rate:.1%} of {data.costs['total_calls']} "
                     f"calls succeeded ({data.costs['by_status']}).")
    return found


def _rec_learning(data: ReportData) -> list[str]:
    trend = data.criterion("Learning Improvement")
    if trend.passed or trend.value is None:
        return []
    return [f"Review learning: confidence did not increase over the run ({trend.measured})."]


def recommendations(data: ReportData) -> list[str]:
    """Rules applied to the measurements; each recommendation quotes what triggered it."""
    found: list[str] = []
    for rule in (_rec_mandatory, _rec_categories, _rec_noise, _rec_latency, _rec_memory,
                 _rec_backlog, _rec_cost, _rec_learning):
        found += rule(data)
    if data.gaps:
        found.append(f"Check the log directory: {len(data.gaps)} data gaps (listed below) "
                     "left parts of this report without their records.")
    if not found:
        met = sum(c.passed for c in data.criteria)
        found.append(f"No change indicated: all {met} criteria met and no figure close to a "
                     "limit.")
    return found


def conclusion(data: ReportData) -> str:
    mandatory = [c for c in data.criteria if c.mandatory]
    performance = [c for c in data.criteria if not c.mandatory]
    failed = data.failed_mandatory
    peak = data.memory_peak
    text = (f"Run {data.run.run_id} {data.status}: {len(mandatory) - len(failed)} of "
            f"{len(mandatory)} mandatory criteria passed"
            + (f" (failed: {', '.join(failed)})" if failed else "")
            + f"; {sum(c.passed for c in performance)} of {len(performance)} performance "
            f"criteria met. Detection accuracy {_pct(data.scores['accuracy'])} over "
            f"{data.scores['events_classified']} classified events, latency p95 "
            f"{_seconds(data.latency_p95_s)}, total cost {_usd(data.costs['total_cost_usd'])}, "
            f"peak process memory {'-' if peak is None else f'{peak[0]:.0f} MB'}. ")
    if failed:
        return text + "Not ready for continuous operation until the failed criteria pass."
    return text + "By the plan's mandatory criteria the system is ready for continuous operation."
