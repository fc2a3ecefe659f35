"""A run's records read into a ``ReportData``: the report's extraction step.

``build_report_data`` reads the journal, pattern store and cost ledger of
TRINITY_DATA_DIR (read-only) and the snapshot files, alerts.log and test config of the
log directory into one ``ReportData``: the criteria as ``criteria.evaluate`` measures
them, every event with its detection (``EventResult``), the ledger's totals, the alerts,
the series the charts plot (``cost_series``, ``confidence_series`` and the snapshot
lines) and the peaks the recommendations look at. A missing or empty log directory, a
log directory of another run, a missing or unreadable store and an unknown run id are a
``ReportError``; torn or missing snapshot files are listed as data gaps instead.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity import measures
from trinity.contract import AGENTS, FAILED_STATUSES
from trinity.contract import NONE as NOISE
from trinity.controller.reports import criteria
from trinity.controller.reports.charts import Line
from trinity.controller.reports.criteria import Criterion
from trinity.db import reading
from trinity.errors import ConfigError, TrinityError
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import patterns as pattern_store
from trinity.stores.costs import summarize
from trinity.stores.run_logs import KINDS, TEST_CONFIG, holds_run_logs, read_json, read_snapshots


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
class ExternalResult:
    """An event ``trinity emit`` journaled during the run, what WITNESS made of it and
    the outcomes it ended in (no ground truth: nobody said what it is)."""

    event_id: str
    sim_h: float
    detected: bool
    pattern: str | None = None
    confidence: float | None = None
    outcomes: tuple[str, ...] = ()  # statuses, in the order recorded


@dataclass(frozen=True)
class FailedOutcome:
    """A task EXECUTOR could not do, or a plan ARCHITECT could not make, and why."""

    task_id: str
    event_id: str
    delegate: str
    status: str
    reason: str
    external: bool


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
    # people's corrections in the pattern store (measures.corrections_summary)
    corrections: dict[str, Any] = field(
        default_factory=lambda: measures.corrections_summary({}))
    # the external events that arrived during the run (``trinity emit``)
    external: tuple[ExternalResult, ...] = ()
    # every outcome's status, counted (external events' included), and the failed ones
    outcome_statuses: dict[str, int] = field(default_factory=dict)
    failed: tuple[FailedOutcome, ...] = ()

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
    with _reading(settings.messages_db) as conn:
        recorded = runs.all_runs(conn)
    if not recorded:
        raise ReportError(f"no run recorded in {settings.messages_db}")
    # An archived run's folder is named by its run id (logs/archive/<run_id>): without
    # a readable test config, that name still says whose logs they are.
    named = log_dir.name if any(r.run_id == log_dir.name for r in recorded) else None
    wanted = run_id or logged or named
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


def _external(settings: Settings, run_id: str,
              recorded: Sequence[runs.Outcome]) -> tuple[ExternalResult, ...]:
    with _reading(settings.messages_db) as conn:
        arrived = runs.external_events(conn, run_id)
    if not arrived:
        return ()
    decisions: dict[str, pattern_store.Decision] = {}
    if settings.patterns_db.exists():
        with _reading(settings.patterns_db) as conn:
            decisions = pattern_store.run_decisions(conn, run_id)
    statuses: dict[str, list[str]] = {}
    for o in recorded:
        if o.external:
            statuses.setdefault(o.event_id, []).append(o.status)
    found = []
    for e in arrived:
        d = decisions.get(e.event_id)
        found.append(ExternalResult(
            e.event_id, e.sim_elapsed_s / 3600, d is not None, d.pattern if d else None,
            d.confidence if d else None, tuple(statuses.get(e.event_id, ()))))
    return tuple(found)


def _corrections(settings: Settings) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    if settings.patterns_db.exists():
        with _reading(settings.patterns_db) as conn:
            counts = pattern_store.correction_counts(conn)
    return measures.corrections_summary(counts)


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
        recorded = runs.outcomes(conn, run.run_id)
        failed = tuple(
            FailedOutcome(o.task_id, o.event_id, o.delegate, o.status,
                          runs.failure_reason(runs.outcome_product(conn, o.task_id)), o.external)
            for o in recorded if o.status in FAILED_STATUSES)
    external = _external(settings, run.run_id, recorded)
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
        snapshot_counts={k: len(v) for k, v in snaps.items()}, gaps=tuple(gaps),
        corrections=_corrections(settings), external=external,
        outcome_statuses=dict(Counter(o.status for o in recorded)), failed=failed)
