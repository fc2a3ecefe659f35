"""``trinity report``: the test plan's validation report of one run, as Markdown and HTML.

Extraction and rendering are separate. ``build_report_data`` reads the run's records
(the journal, pattern store and cost ledger in TRINITY_DATA_DIR, read-only, and the
snapshot files and alerts.log of the log directory) into a ``ReportData``: the
criteria as ``criteria.evaluate`` measures them, every event with its detection, the
ledger's totals, the alerts, and the series the charts plot. ``write_charts`` draws
the four charts from those series; ``document`` lays the report out as blocks
(headings, lists, tables, images) that ``render_markdown`` and ``render_html`` turn
into text, so both versions carry the same content. Every figure shown is computed
from recorded data; recommendations are rules applied to those figures.

Errors: ``ReportError`` (a ``TrinityError``) with a one-line message for a missing or
empty log directory, a log directory of another run, a missing or unreadable store and
an unknown run id. A partly written log directory (torn or missing snapshot files) is
reported, with what is missing listed under "Data gaps".
"""

from __future__ import annotations

import base64
import html
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trinity import measures
from trinity.contract import AGENTS, PATTERNS
from trinity.contract import NONE as NOISE
from trinity.controller.reports import charts, criteria
from trinity.controller.reports.charts import Line
from trinity.controller.reports.criteria import Criterion
from trinity.db import reading
from trinity.errors import ConfigError, TrinityError
from trinity.plan import (
    ACCURACY_TARGET,
    BACKLOG_LIMIT,
    CONFIDENCE_TARGET,
    COST_PER_24H_USD,
    LATENCY_TARGET_S,
    LOCAL_SHARE_TARGET,
    MEMORY_GROWTH_PCT_PER_HOUR,
    MEMORY_LIMIT_MB,
)
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import patterns as pattern_store
from trinity.stores.costs import summarize
from trinity.stores.run_logs import KINDS, TEST_CONFIG, holds_run_logs, read_json, read_snapshots

# A memory sample above this share of the per-process limit is an incident.
MEMORY_WARN_SHARE = 0.8
CHART_KEYS = ("cost", "accuracy", "memory", "confidence")


class ReportError(TrinityError):
    """The report cannot be made; the message says why in one line."""


@dataclass(frozen=True)
class EventResult:
    """One emitted event of the run and what WITNESS made of it."""

    event_id: str
    cycle: int
    noise: int
    truth: str
    sim_h: float
    detected: bool  # a detection is recorded
    pattern: str | None = None
    label: str | None = None  # the detector's best label, also when it abstained
    confidence: float | None = None
    latency_s: float | None = None  # emitted -> detection recorded, real seconds
    witness_ms: float | None = None  # WITNESS's own processing time

    @property
    def correct(self) -> bool:
        return self.detected and (self.pattern or NOISE) == self.truth


@dataclass(frozen=True)
class ReportData:
    run: runs.Run
    ended_ms: int | None
    data_dir: Path
    log_dir: Path
    criteria: tuple[Criterion, ...]
    events: tuple[EventResult, ...]
    outcomes: int  # events with a recorded outcome
    scores: dict[str, Any]  # snapshots.detection_scores of the run
    costs: dict[str, Any]  # costs.summarize of the run's ledger rows
    local_share_by_agent: dict[str, float | None]
    budget_usd: float
    max_hourly_cost_usd: float | None  # highest cost_last_hour_usd of the cost snapshots
    alerts: tuple[dict[str, Any], ...]
    # the chart series: cumulative cost and calls from the ledger, accuracy and memory
    # from the hourly and 5-minute snapshots, confidence from the pattern store
    cost_lines: tuple[Line, ...]
    call_lines: tuple[Line, ...]
    accuracy_lines: tuple[Line, ...]
    memory_lines: tuple[Line, ...]
    confidence_lines: tuple[Line, ...]
    memory_peak: tuple[float, str, float] | None  # (MB, process, simulated hour)
    backlog_peak: tuple[int, str, float] | None  # (pending, queue, simulated hour)
    last_memory_growth_pct: float | None
    snapshot_counts: dict[str, int]
    gaps: tuple[str, ...] = field(default_factory=tuple)

    def criterion(self, name: str) -> Criterion:
        return next(c for c in self.criteria if c.name == name)

    @property
    def failed_mandatory(self) -> list[str]:
        return [c.name for c in self.criteria if c.mandatory and not c.passed]

    @property
    def status(self) -> str:
        return "PASSED" if criteria.mandatory_passed(list(self.criteria)) else "FAILED"

    @property
    def latencies_s(self) -> list[float]:
        return [e.latency_s for e in self.events if e.latency_s is not None]

    @property
    def latency_p95_s(self) -> float | None:
        return measures.percentile(self.latencies_s, 95)


# -- reading ---------------------------------------------------------------------------

@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only view of a store; a store that cannot be read is a ReportError."""
    try:
        with reading(path) as conn:
            yield conn
    except sqlite3.Error as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None


def _number(record: dict[str, Any], *keys: str) -> float | None:
    value: Any = record
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _load_snapshots(log_dir: Path, kind: str, run_id: str,
                    gaps: list[str]) -> list[dict[str, Any]]:
    """The run's snapshot files of ``kind``, by elapsed time; unreadable ones noted."""
    found, unreadable = read_snapshots(log_dir, kind, run_id)
    unreadable += [name for name, snap in found.items() if _number(snap, "elapsed_hours") is None]
    folder = KINDS[kind][0]
    gaps += [f"{folder}/{name}: unreadable (torn, empty or not a snapshot)"
             for name in sorted(unreadable)]
    return [snap for snap in found.values() if _number(snap, "elapsed_hours") is not None]


def _check_log_dir(log_dir: Path) -> None:
    if not log_dir.exists():
        raise ReportError(f"log directory {log_dir} does not exist")
    if not log_dir.is_dir():
        raise ReportError(f"{log_dir} is not a directory")
    if not holds_run_logs(log_dir):
        raise ReportError(f"log directory {log_dir} holds no run logs (no snapshot, "
                          f"alerts.log or {TEST_CONFIG})")


def _resolve_run(settings: Settings, log_dir: Path, run_id: str | None,
                 gaps: list[str]) -> runs.Run:
    """``run_id``, else the run whose logs the directory holds, else the latest run."""
    config = None
    if (log_dir / TEST_CONFIG).exists():
        config = read_json(log_dir / TEST_CONFIG)
        if config is None:
            gaps.append(f"{TEST_CONFIG}: unreadable (torn or not JSON)")
    logged = str(config["run_id"]) if config and config.get("run_id") else None
    if run_id and logged and run_id != logged:
        raise ReportError(f"{log_dir} holds the logs of run {logged}, not {run_id} (a new "
                          f"run moves the previous run's logs to {log_dir.parent}/archive/)")
    wanted = run_id or logged
    with _reading(settings.messages_db) as conn:
        recorded = runs.all_runs(conn)
    if not recorded:
        raise ReportError(f"no run recorded in {settings.messages_db}")
    chosen = recorded[0] if wanted is None else next(
        (r for r in recorded if r.run_id == wanted), None)
    if chosen is None:
        known = ", ".join(r.run_id for r in recorded[:5])
        raise ReportError(f"no run {wanted} in {settings.messages_db} (latest runs: {known})")
    return chosen


def _events(settings: Settings, run_id: str, gaps: list[str]) -> list[EventResult]:
    with _reading(settings.messages_db) as conn:
        emitted = runs.events(conn, run_id)
    decisions: dict[str, pattern_store.Decision] = {}
    if settings.patterns_db.exists():
        with _reading(settings.patterns_db) as conn:
            decisions = pattern_store.run_decisions(conn, run_id)
    else:
        gaps.append(f"no pattern store at {settings.patterns_db}: no detection to report")
    found = []
    for e in emitted:
        d = decisions.get(e.event_id)
        if d is None:
            found.append(EventResult(e.event_id, e.cycle, e.noise, e.category,
                                     e.sim_elapsed_s / 3600, False))
            continue
        found.append(EventResult(
            e.event_id, e.cycle, e.noise, e.category, e.sim_elapsed_s / 3600, True, d.pattern,
            d.label, d.confidence, (d.detected_ms - e.emitted_ms) / 1000, d.latency_ms))
    return found


def _calls(settings: Settings, run_id: str, gaps: list[str]) -> list[dict[str, Any]]:
    if not settings.costs_db.exists():
        gaps.append(f"no cost ledger at {settings.costs_db}: no model call to report")
        return []
    with _reading(settings.costs_db) as conn:
        return costs.calls(conn, run_id)


# -- series ----------------------------------------------------------------------------

def _cumulative(x: Sequence[float], y: Sequence[float], label: str) -> Line:
    total, sums = 0.0, []
    for value in y:
        total += value
        sums.append(round(total, 6))
    return Line(label, tuple(x), tuple(sums), steps=True)


def cost_series(calls: Sequence[dict[str, Any]]) -> tuple[tuple[Line, ...], tuple[Line, ...]]:
    """Cumulative cost (total and per agent) and cumulative calls, at each call's
    simulated time (calls ordered by simulated time, then by wall-clock time)."""
    ordered = sorted(calls, key=lambda c: (c["sim_elapsed_s"] or 0.0, c["ts_ms"]))
    hours = [(c["sim_elapsed_s"] or 0.0) / 3600 for c in ordered]
    cost_lines = [_cumulative(hours, [c["cost_usd"] for c in ordered], "cost: total")]
    for agent in sorted({c["agent"] for c in ordered}):
        mine = [c for c in ordered if c["agent"] == agent]
        cost_lines.append(_cumulative([(c["sim_elapsed_s"] or 0.0) / 3600 for c in mine],
                                      [c["cost_usd"] for c in mine], f"cost: {agent}"))
    calls_line = _cumulative(hours, [1.0] * len(ordered), "model calls (cumulative)")
    return tuple(cost_lines), (calls_line,)


def _snapshot_line(snaps: Sequence[dict[str, Any]], label: str, *keys: str) -> Line:
    points = [(float(s["elapsed_hours"]), _number(s, *keys)) for s in snaps]
    kept = [(x, y) for x, y in points if y is not None]
    return Line(label, tuple(x for x, _ in kept), tuple(y for _, y in kept))


def confidence_series(events: Sequence[EventResult]) -> tuple[Line, ...]:
    """Each detection's confidence at its event's simulated hour, and the running mean."""
    found = [e for e in events if e.pattern is not None and e.confidence is not None]
    x = tuple(e.sim_h for e in found)
    values = [float(e.confidence or 0.0) for e in found]
    running = tuple(round(sum(values[:i + 1]) / (i + 1), 6) for i in range(len(values)))
    return (Line("detection confidence", x, tuple(values), points=True),
            Line("running mean", x, running))


def _memory_peak(samples: Sequence[dict[str, Any]]) -> tuple[float, str, float] | None:
    peak: tuple[float, str, float] | None = None
    for sample in samples:
        processes = sample.get("processes")
        if not isinstance(processes, dict):
            continue
        for name, proc in processes.items():
            rss = _number(proc, "rss_mb") if isinstance(proc, dict) else None
            if rss is not None and (peak is None or rss > peak[0]):
                peak = (rss, str(name), float(sample["elapsed_hours"]))
    return peak


def _backlog_peak(samples: Sequence[dict[str, Any]]) -> tuple[int, str, float] | None:
    peak: tuple[int, str, float] | None = None
    for sample in samples:
        queues = sample.get("queues")
        for queue, pending in (queues.items() if isinstance(queues, dict) else ()):
            if isinstance(pending, int) and (peak is None or pending > peak[0]):
                peak = (pending, str(queue), float(sample["elapsed_hours"]))
    return peak


def _snapshot_gaps(settings: Settings, run: runs.Run, log_dir: Path, found: dict[str, int],
                   gaps: list[str]) -> None:
    with _reading(settings.messages_db) as conn:
        written = {kind: len(paths) for kind, paths in
                   runs.snapshots_written(conn, run.run_id).items()}
    for kind, (folder, _) in KINDS.items():
        if found[kind] < written.get(kind, 0):
            gaps.append(f"{folder}: {found[kind]} of the {written[kind]} snapshot files the "
                        f"journal records as written for this run are in {log_dir / folder}")


def _local_share_by_agent(calls: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    shares: dict[str, float | None] = {}
    for agent in sorted({c["agent"] for c in calls} | set(AGENTS)):
        mine = [c for c in calls if c["agent"] == agent]
        shares[agent] = sum(bool(c["local"]) for c in mine) / len(mine) if mine else None
    return shares


def build_report_data(settings: Settings, log_dir: Path | None = None,
                      run_id: str | None = None) -> ReportData:
    """Everything the report shows, for ``run_id`` (default: the run whose logs
    ``log_dir`` holds, else the latest) from the stores of ``settings``."""
    log_dir = log_dir or settings.log_dir
    _check_log_dir(log_dir)
    if not settings.messages_db.exists():
        raise ReportError(f"no journal at {settings.messages_db}: set TRINITY_DATA_DIR to the "
                          "folder holding the run's stores")
    gaps: list[str] = []
    run = _resolve_run(settings, log_dir, run_id, gaps)
    snaps = {kind: _load_snapshots(log_dir, kind, run.run_id, gaps) for kind in KINDS}
    ended_ms = run.ended_ms
    # criteria's own selection: alerts tagged with the run or raised while it ran
    alerts = criteria.run_alerts(log_dir, run, ended_ms)
    if not any(snaps.values()) and not alerts and not (log_dir / TEST_CONFIG).exists():
        raise ReportError(f"{log_dir} holds no snapshot or alert of run {run.run_id}")
    _snapshot_gaps(settings, run, log_dir, {k: len(v) for k, v in snaps.items()}, gaps)
    # Read the stores first: an unreadable one is named in the error.
    events = _events(settings, run.run_id, gaps)
    calls = _calls(settings, run.run_id, gaps)
    try:
        _, measured = criteria.evaluate(settings.replace(log_dir=log_dir), run.run_id)
    except (sqlite3.Error, ConfigError) as exc:
        raise ReportError(f"cannot evaluate the criteria of run {run.run_id}: {exc}") from None
    cost_lines, call_lines = cost_series(calls)
    with _reading(settings.messages_db) as conn:
        outcomes = runs.progress(conn, run.run_id)["completed"]
    hourly = [v for s in snaps["costs"] if (v := _number(s, "cost_last_hour_usd")) is not None]
    growth = [v for s in snaps["metrics"]
              if (v := _number(s, "memory_growth_pct_per_hour")) is not None]
    return ReportData(
        run=run, ended_ms=ended_ms, data_dir=settings.data_dir,
        log_dir=log_dir,
        criteria=tuple(measured), events=tuple(events), outcomes=int(outcomes),
        scores=measures.detection_scores(
            {e.event_id: (e.truth, e.sim_h) for e in events},
            {e.event_id: (e.pattern, e.confidence or 0.0) for e in events if e.detected}),
        costs=summarize(calls), local_share_by_agent=_local_share_by_agent(calls),
        budget_usd=runs.budget_usd(run, settings.budget_usd),
        max_hourly_cost_usd=max(hourly, default=None), alerts=tuple(alerts),
        cost_lines=cost_lines, call_lines=call_lines,
        accuracy_lines=(
            _snapshot_line(snaps["patterns"], "accuracy (cumulative)", "scoring", "accuracy"),
            _snapshot_line(snaps["patterns"], "detection rate (cumulative)", "scoring",
                           "detection_rate")),
        memory_lines=(
            _snapshot_line(snaps["metrics"], "largest process RSS (the limit's measure)",
                           "memory_max_process_rss_mb"),
            _snapshot_line(snaps["metrics"], "all processes together (PSS)", "memory_mb")),
        confidence_lines=confidence_series(events),
        memory_peak=_memory_peak(snaps["metrics"]),
        backlog_peak=_backlog_peak(snaps["metrics"]),
        last_memory_growth_pct=growth[-1] if growth else None,
        snapshot_counts={k: len(v) for k, v in snaps.items()}, gaps=tuple(gaps))


def write_charts(data: ReportData, folder: Path, stem: str) -> list[charts.Chart]:
    """The four charts as ``<stem>_<key>.png`` in ``folder``."""
    def path(key: str) -> Path:
        return folder / f"{stem}_{key}.png"

    return [
        charts.cost_chart(data.cost_lines, data.call_lines, path("cost")),
        charts.accuracy_chart(data.accuracy_lines, path("accuracy"), ACCURACY_TARGET),
        charts.memory_chart(data.memory_lines, path("memory"), MEMORY_LIMIT_MB),
        charts.confidence_chart(data.confidence_lines, path("confidence"), CONFIDENCE_TARGET),
    ]


# -- what the figures say ----------------------------------------------------------------

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


# -- the document ------------------------------------------------------------------------

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
        f"Status: {data.status} {mark}{failed}",
    ])]


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
                     f"{sum(confs) / len(confs):.3f}" if confs else "-"))
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


# -- rendering ---------------------------------------------------------------------------

_MD_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def md_escape(text: str) -> str:
    """Text safe inside Markdown: one line, no table-breaking pipe, no raw HTML tag."""
    return _MD_TAG.sub(r"\\<", " ".join(text.split()).replace("|", r"\|"))


def _md_block(block: Block) -> list[str]:
    if block.kind == "heading":
        return ["#" * block.level + " " + md_escape(block.text), ""]
    if block.kind == "paragraph":
        return [md_escape(block.text), ""]
    if block.kind in ("bullets", "numbered"):
        marks = [f"{i}." if block.kind == "numbered" else "-"
                 for i in range(1, len(block.items) + 1)]
        return [f"{m} {md_escape(item)}" for m, item in zip(marks, block.items, strict=True)] + [""]
    if block.kind == "table":
        head, *body = block.rows
        lines = ["| " + " | ".join(md_escape(c) for c in head) + " |",
                 "|" + "|".join(" --- " for _ in head) + "|"]
        return lines + ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in body] + [""]
    assert block.kind == "image" and block.path is not None
    from urllib.parse import quote

    return [f"![{md_escape(block.text)}]({quote(block.path.name)})", ""]


def render_markdown(data: ReportData, drawn: Sequence[charts.Chart]) -> str:
    """The report as Markdown; chart images are linked by file name (same folder)."""
    return "\n".join(line for block in document(data, drawn) for line in _md_block(block))


_CSS = ("body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}table{border-collapse:collapse;margin:.5rem 0}"
        "td,th{border:1px solid #bbb;padding:.25rem .5rem;text-align:left}"
        "th{background:#eee}img{max-width:100%}figure{margin:1rem 0}")


def _html_block(block: Block) -> str:
    esc = html.escape
    if block.kind == "heading":
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    if block.kind == "paragraph":
        return f"<p>{esc(block.text)}</p>"
    if block.kind in ("bullets", "numbered"):
        tag = "ol" if block.kind == "numbered" else "ul"
        return f"<{tag}>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + f"</{tag}>"
    if block.kind == "table":
        head, *body = block.rows
        return ("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                          for row in body) + "</tbody></table>")
    assert block.kind == "image" and block.path is not None
    encoded = base64.b64encode(block.path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(block.text)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(block.text)}</figcaption></figure>")


def render_html(data: ReportData, drawn: Sequence[charts.Chart]) -> str:
    """The same report as one self-contained HTML page (charts as data URIs)."""
    body = "\n".join(_html_block(b) for b in document(data, drawn))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(f'Trinity 24-hour test report {data.run.run_id}')}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


# -- files and the command ---------------------------------------------------------------

def default_output(settings: Settings, data: ReportData) -> Path:
    """``reports/24h_test_YYYYMMDD.md`` in the data directory, dated by the run's start."""
    day = datetime.fromtimestamp(data.run.started_ms / 1000, UTC).strftime("%Y%m%d")
    return settings.data_dir / "reports" / f"24h_test_{day}.md"


def write_report(data: ReportData, output: Path) -> list[Path]:
    """The Markdown report at ``output``, its HTML twin beside it (``.html``) and the four
    chart PNGs (``<stem>_<chart>.png``); returns the paths written."""
    if output.is_dir():
        raise ReportError(f"--output {output} is a directory; name the report's .md file")
    html_path = output.with_suffix(".html")
    try:
        drawn = write_charts(data, output.parent, output.stem)
        output.write_text(render_markdown(data, drawn), encoding="utf-8")
        html_path.write_text(render_html(data, drawn), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write the report: {exc}") from None
    return [output, html_path, *(c.path for c in drawn)]
