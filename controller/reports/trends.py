"""``trinity trends``: the plan's "Metrics to Track Over Time" across every recorded run.

Every run is in the journal's ``runs`` table; its logs are in the log folder
(``logs/24h_test``) while it is the latest and in ``archive/<run id>`` beside it once a
later run has started (``trinity.stores.run_logs.archive``). ``collect`` finds each run's
log folder and reads the run with the report's own extraction
(``report.build_report_data``), so every figure here is the one that run's own report
shows. Per run: cost (and, for a run shorter than 24 simulated hours, that cost scaled
to 24 h), detection accuracy, the detected patterns' average confidence, peak memory of
all processes together and of the largest one, and whether the run passed. Across runs
of one kind: the change of that average confidence per week (the pattern store's
detections, run after run: learning).

Runs are told apart by their configured duration: a run shorter than 24 simulated
hours is a smoke test (the plan's weekly 2-hour one), one of 24 hours or more a full
run; each kind is judged and charted on its own.

Errors: ``TrendsError`` (a ``TrinityError``) with a one-line message for a missing
input folder, one that holds no run logs, a missing journal and a selection with no
readable run. A run whose logs cannot be found or read is left out with a one-line note
(``Trends.notes``); a run with torn snapshot files is kept, as its report keeps it, and
its data gaps noted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from trinity.controller.reports.report import ReportData, ReportError, build_report_data
from trinity.db import reading
from trinity.errors import TrinityError
from trinity.plan import (
    COST_PER_24H_USD,
    LEARNING_IMPROVEMENT,
    LEARNING_PER_WEEK,
    LONG_RUN_ACCURACY,
    MEMORY_STABILITY,
    MEMORY_TOTAL_MB,
    PATTERN_CONFIDENCE,
    Target,
)
from trinity.settings import Settings
from trinity.stores import runs
from trinity.stores.run_logs import ARCHIVE, TEST_CONFIG, holds_run_logs, read_json

Kind = Literal["smoke", "full"]
SMOKE: Kind = "smoke"
FULL: Kind = "full"
KINDS: tuple[Kind, ...] = (SMOKE, FULL)
# The plan's run lengths: the weekly smoke test and the monthly full run.
SMOKE_HOURS = 2.0
FULL_HOURS = 24.0
WEEK_S = 7 * 24 * 3600

# The plan's "Metrics to Track Over Time", judged as its success criteria are.
COST_PER_24H = Target("Cost per 24 h", False, f"< ${COST_PER_24H_USD:.2f} per 24 h",
                      COST_PER_24H_USD, "lower")
ACCURACY_OVER_TIME = Target("Detection accuracy", False, f"> {LONG_RUN_ACCURACY:.0%}",
                            LONG_RUN_ACCURACY, "higher")
LEARNING_RATE = Target("Learning", False, f"+{LEARNING_PER_WEEK:.2f} confidence per week",
                       LEARNING_PER_WEEK, "higher", inclusive=True)
MEMORY_OVER_TIME = Target("Peak memory", False,
                          f"< {MEMORY_TOTAL_MB:.0f} MB, all processes together",
                          MEMORY_TOTAL_MB, "lower")
TARGETS = (COST_PER_24H, ACCURACY_OVER_TIME, LEARNING_RATE, MEMORY_OVER_TIME)


class TrendsError(TrinityError):
    """The trends cannot be shown; the message says why in one line."""


def kind_of(duration_h: float) -> Kind:
    """A run shorter than a full 24 simulated hours is a smoke test."""
    return FULL if duration_h >= FULL_HOURS else SMOKE


@dataclass(frozen=True)
class RunFigures:
    """One run's tracked figures, each as the run's own report has it."""

    run_id: str
    kind: Kind
    started_ms: int
    run_status: str          # the journal's: completed, stopped, active, ...
    result: str              # the report's: PASSED or FAILED (the mandatory criteria)
    failed_criteria: tuple[str, ...]
    duration_h: float        # configured
    simulated_h: float       # covered before the run ended
    time_scale: float
    log_dir: str
    cost_usd: float
    cost_per_24h_usd: float | None  # cost_usd scaled to 24 simulated hours
    cost_scaled_from_h: float | None  # the hours it was scaled from; None when not scaled
    accuracy: float | None
    events_classified: int
    confidence: float | None  # the detected patterns' average (Pattern Confidence)
    learning_in_run: float | None  # the report's Learning Improvement (later - earlier half)
    peak_memory_mb: float | None  # all processes together (PSS), the report's memory chart
    peak_process_mb: float | None  # the largest process (RSS), the report's Memory Stability
    data_gaps: int
    confidence_change: float | None = None  # since the previous run of its kind
    confidence_per_week: float | None = None  # that change over the time between them

    @property
    def passed(self) -> bool:
        return self.result == "PASSED"

    def meets(self, target: Target) -> bool:
        value = {COST_PER_24H: self.cost_per_24h_usd, ACCURACY_OVER_TIME: self.accuracy,
                 MEMORY_OVER_TIME: self.peak_memory_mb,
                 LEARNING_RATE: self.confidence_per_week}[target]
        return target.met(value)


@dataclass(frozen=True)
class KindSummary:
    """The runs of one kind together: how many passed, and learning across them."""

    kind: Kind
    runs: int
    passed: int
    failed: int
    # least-squares slope of the average confidence against the runs' start, per week
    learning_per_week: float | None
    span_days: float  # from the first run's start to the last's
    latest: RunFigures | None


@dataclass(frozen=True)
class Trends:
    input_dir: Path
    runs: tuple[RunFigures, ...]  # oldest first
    notes: tuple[str, ...]  # runs left out, data gaps: one line each
    summaries: tuple[KindSummary, ...]

    def of_kind(self, kind: Kind) -> list[RunFigures]:
        return [r for r in self.runs if r.kind == kind]

    def as_json(self) -> dict[str, Any]:
        return {
            "input": str(self.input_dir),
            "targets": {t.name: t.text for t in TARGETS},
            "runs": [asdict(r) for r in self.runs],
            "summaries": [{**asdict(s), "latest": s.latest.run_id if s.latest else None}
                          for s in self.summaries],
            "notes": list(self.notes),
        }


# -- finding the runs' logs --------------------------------------------------------------

def run_folders(input_dir: Path, current: Path,
                known: set[str]) -> tuple[dict[str, Path], list[str]]:
    """run id -> its log folder (the current one, then ``archive/*``), and a note for
    each folder that names no recorded run."""
    found: dict[str, Path] = {}
    notes: list[str] = []
    archive = input_dir / ARCHIVE
    candidates = [current] + (sorted(p for p in archive.iterdir() if p.is_dir())
                              if archive.is_dir() else [])
    for folder in candidates:
        if not (folder / TEST_CONFIG).exists() and folder == current:
            continue  # no run has written here yet
        config = read_json(folder / TEST_CONFIG)
        run_id = str(config["run_id"]) if config and config.get("run_id") else None
        if run_id is None and folder.name in known:
            run_id = folder.name  # archive/<run id>: the folder says whose logs they are
        if run_id is None:
            notes.append(f"{_shown(folder, input_dir)}: {TEST_CONFIG} missing or unreadable "
                         "and the folder is named after no recorded run; left out")
            continue
        if run_id not in known:
            notes.append(f"{_shown(folder, input_dir)}: run {run_id} is not in the journal; "
                         "left out")
            continue
        if run_id in found:
            notes.append(f"{_shown(folder, input_dir)}: a second folder of run {run_id} "
                         f"(using {_shown(found[run_id], input_dir)}); left out")
            continue
        found[run_id] = folder
    return found, notes


def _shown(folder: Path, input_dir: Path) -> str:
    try:
        return str(folder.relative_to(input_dir))
    except ValueError:
        return str(folder)


# -- one run's figures -------------------------------------------------------------------

def _max_y(data: ReportData, index: int) -> float | None:
    line = data.memory_lines[index] if len(data.memory_lines) > index else None
    return max(line.y) if line is not None and line.y else None


def _covered_h(run: runs.Run) -> float:
    """Simulated hours the run covered: all of them once it ran to its end (its last
    checkpoint may be a little earlier: the run is not checkpointed as it finishes),
    else up to its last checkpoint."""
    duration_s = run.duration_s
    if run.status in (runs.COMPLETED, runs.TIMED_OUT) or run.sim_elapsed_s <= 0:
        return duration_s / 3600
    return min(run.sim_elapsed_s, duration_s) / 3600


def figures_of(data: ReportData) -> RunFigures:
    """A run's tracked figures from its report's data."""
    run = data.run
    duration_h = run.duration_s / 3600
    simulated_h = _covered_h(run)
    cost = float(data.costs["total_cost_usd"])
    scaled = simulated_h != FULL_HOURS
    confidence = data.criterion(PATTERN_CONFIDENCE.name).value
    learning = data.criterion(LEARNING_IMPROVEMENT.name).value
    return RunFigures(
        run_id=run.run_id, kind=kind_of(duration_h), started_ms=run.started_ms,
        run_status=run.status, result=data.status,
        failed_criteria=tuple(data.failed_mandatory), duration_h=duration_h,
        simulated_h=simulated_h, time_scale=run.time_scale, log_dir=str(data.log_dir),
        cost_usd=cost,
        cost_per_24h_usd=cost * FULL_HOURS / simulated_h if simulated_h > 0 else None,
        cost_scaled_from_h=simulated_h if scaled else None,
        accuracy=data.scores["accuracy"], events_classified=int(data.scores["events_classified"]),
        confidence=None if confidence is None else float(confidence),
        learning_in_run=None if learning is None else float(learning),
        peak_memory_mb=_max_y(data, 1),
        peak_process_mb=_float(data.criterion(MEMORY_STABILITY.name).value),
        data_gaps=len(data.gaps))


def _float(value: float | int | None) -> float | None:
    return None if value is None else float(value)


# -- across runs ---------------------------------------------------------------------------

def _with_changes(found: Sequence[RunFigures]) -> list[RunFigures]:
    """Each run with its confidence change since the previous run of its kind (that has
    a confidence), and that change per week of time between their starts."""
    result = []
    previous: dict[Kind, RunFigures] = {}
    for r in found:
        before = previous.get(r.kind)
        if r.confidence is not None and before is not None and before.confidence is not None:
            change = r.confidence - before.confidence
            weeks = (r.started_ms - before.started_ms) / 1000 / WEEK_S
            r = replace(r, confidence_change=change,
                        confidence_per_week=change / weeks if weeks > 0 else None)
        result.append(r)
        if r.confidence is not None:
            previous[r.kind] = r
    return result


def learning_per_week(found: Sequence[RunFigures]) -> float | None:
    """Least-squares slope of the runs' average confidence against their start, in
    confidence per week (None under two runs with a confidence, or no time between)."""
    points = [(r.started_ms / 1000 / WEEK_S, r.confidence) for r in found
              if r.confidence is not None]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def summarize(kind: Kind, found: Sequence[RunFigures]) -> KindSummary:
    mine = [r for r in found if r.kind == kind]
    passed = sum(r.passed for r in mine)
    span = (mine[-1].started_ms - mine[0].started_ms) / 1000 / 86400 if mine else 0.0
    return KindSummary(kind, len(mine), passed, len(mine) - passed, learning_per_week(mine),
                       span, mine[-1] if mine else None)


def _folders(settings: Settings, input_dir: Path | None) -> tuple[Path, Path]:
    """(the folder holding the runs' logs, the latest run's folder in it), checked."""
    current = settings.log_dir
    if input_dir is None:
        input_dir = current.parent
    elif current.parent != input_dir:
        current = input_dir / current.name
    if not input_dir.exists():
        raise TrendsError(f"log folder {input_dir} does not exist")
    if not input_dir.is_dir():
        raise TrendsError(f"{input_dir} is not a folder")
    if not (current.is_dir() or (input_dir / ARCHIVE).is_dir()):
        if holds_run_logs(input_dir):
            raise TrendsError(f"{input_dir} is one run's log folder; pass the folder holding "
                              f"it and {ARCHIVE}/ ({input_dir.parent})")
        raise TrendsError(f"{input_dir} holds no run logs (neither {current.name}/ nor "
                          f"{ARCHIVE}/)")
    return input_dir, current


def _recorded(settings: Settings) -> list[runs.Run]:
    """Every run in the journal, oldest first."""
    if not settings.messages_db.exists():
        raise TrendsError(f"no journal at {settings.messages_db}: set TRINITY_DATA_DIR to the "
                          "folder holding the runs' stores")
    try:
        with reading(settings.messages_db) as conn:
            return list(reversed(runs.all_runs(conn)))
    except (sqlite3.Error, ValueError) as exc:  # a damaged store or a torn config column
        raise TrendsError(f"cannot read the runs in {settings.messages_db}: {exc}") from None


def _duration_h(run: runs.Run) -> float | None:
    """The run's configured duration in hours; None when the configuration it recorded
    lacks what the report reads (a duration, a time scale)."""
    try:
        return run.duration_s / 3600 if run.time_scale > 0 else None
    except (KeyError, TypeError, ValueError):
        return None


def collect(settings: Settings, input_dir: Path | None = None,
            kind: Kind | None = None) -> Trends:
    """Every recorded run whose logs are in ``input_dir`` (the folder holding the log
    folder and ``archive/``; default: the log folder's parent), oldest first, each read as
    its report reads it; ``kind`` keeps only smoke tests or only full runs."""
    input_dir, current = _folders(settings, input_dir)
    recorded = _recorded(settings)
    folders, notes = run_folders(input_dir, current, {r.run_id for r in recorded})
    found: list[RunFigures] = []
    for run in recorded:
        hours = _duration_h(run)
        if hours is None:
            notes.append(f"run {run.run_id}: its configuration in the journal has no valid "
                         "duration_h or time_scale; left out")
            continue
        if kind is not None and kind_of(hours) != kind:
            continue
        folder = folders.get(run.run_id)
        if folder is None:
            notes.append(f"run {run.run_id}: no log folder in {input_dir} (neither "
                         f"{current.name}/ nor {ARCHIVE}/{run.run_id}/); left out")
            continue
        try:
            data = build_report_data(settings, folder, run.run_id)
        except ReportError as exc:
            notes.append(f"run {run.run_id} ({_shown(folder, input_dir)}): {exc}; left out")
            continue
        if data.gaps:
            notes.append(f"run {run.run_id}: {len(data.gaps)} data gaps, as in its report "
                         f"(first: {data.gaps[0]})")
        found.append(figures_of(data))
    if not found:
        which = f"{kind} " if kind else ""
        reason = f" ({notes[-1]})" if notes else ""
        raise TrendsError(f"no readable {which}run in {input_dir}{reason}")
    found = _with_changes(found)
    return Trends(input_dir, tuple(found), tuple(notes),
                  tuple(summarize(k, found) for k in KINDS if kind in (None, k)))


# -- text ----------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def _signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _mark(met: bool) -> str:
    return "ok" if met else "MISS"


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


TABLE_HEADER = ("Run", "Started (UTC)", "Hours", "Result", "Cost", "Cost per 24 h",
                "Accuracy", "Avg confidence", "Change per week", "Peak memory (all)",
                "Largest process")


def table_rows(found: Sequence[RunFigures]) -> list[tuple[str, ...]]:
    """One row per run: each figure, and against its target where the plan sets one."""
    rows: list[tuple[str, ...]] = []
    for r in found:
        scaled = (f" (scaled from {r.cost_scaled_from_h:g} h)"
                  if r.cost_scaled_from_h is not None else "")
        rows.append((
            r.run_id, _day(r.started_ms), f"{r.simulated_h:g} of {r.duration_h:g}",
            r.result + (f" ({', '.join(r.failed_criteria)})" if r.failed_criteria else ""),
            _usd(r.cost_usd),
            f"{_usd(r.cost_per_24h_usd)}{scaled} {_mark(r.meets(COST_PER_24H))}",
            f"{_pct(r.accuracy)} {_mark(r.meets(ACCURACY_OVER_TIME))}",
            "-" if r.confidence is None else f"{r.confidence:.3f}",
            "-" if r.confidence_per_week is None else
            f"{_signed(r.confidence_per_week)} {_mark(r.meets(LEARNING_RATE))}",
            f"{_mb(r.peak_memory_mb)} {_mark(r.meets(MEMORY_OVER_TIME))}",
            _mb(r.peak_process_mb)))
    return rows


def summary_lines(summary: KindSummary) -> list[str]:
    title = ("Smoke tests (shorter than 24 simulated hours)" if summary.kind == SMOKE
             else "Full runs (24 simulated hours)")
    if not summary.runs:
        return [f"{title}: none recorded"]
    learning = summary.learning_per_week
    lines = [f"{title}: {summary.runs} runs, {summary.passed} passed, {summary.failed} "
             f"failed, over {summary.span_days:.2f} days",
             f"  learning: {_signed(learning)} confidence per week across runs (target "
             f"{LEARNING_RATE.text}) {_mark(LEARNING_RATE.met(learning))}"
             + (" - the runs span less than a day: the weekly rate is extrapolated"
                if learning is not None and summary.span_days < 1 else "")]
    if summary.latest is not None:
        r = summary.latest
        lines.append(f"  latest {r.run_id}: cost per 24 h {_usd(r.cost_per_24h_usd)} (target "
                     f"{COST_PER_24H.text}), accuracy {_pct(r.accuracy)} (target "
                     f"{ACCURACY_OVER_TIME.text}), peak memory {_mb(r.peak_memory_mb)} "
                     f"(target {MEMORY_OVER_TIME.text})")
    return lines


def format_text(trends: Trends) -> str:
    """The trends as the terminal shows them: per kind a summary and one line per run."""
    lines: list[str] = []
    for summary in trends.summaries:
        lines += summary_lines(summary)
        mine = trends.of_kind(summary.kind)
        if mine:
            rows = [TABLE_HEADER, *table_rows(mine)]
            widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                      .rstrip() for row in rows]
        lines.append("")
    lines += [f"note: {n}" for n in trends.notes]
    return "\n".join(lines).rstrip() + "\n"
