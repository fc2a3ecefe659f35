"""The plan's three terminal dashboards (cost, pattern detection, system health), printed
once or refreshed live.

Each dashboard is two steps. ``gather`` reads the stores through read-only connections,
each in one read transaction so that its figures agree with each other, plus the run's
snapshot files, into a data object (:class:`CostView`, :class:`PatternView`,
:class:`SystemView`, or :class:`NoRun` when there is nothing to show yet); ``render_*``
lays that object out with rich the way the plan draws it. Nothing here writes to a store.

With ``--live`` a dashboard refreshes every 5 s, 1 min or 5 min of *simulated* time, as
the plan asks: the run's time scale divides the interval, never below ``MIN_REFRESH_S``
real seconds.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from trinity import db, measures
from trinity.clock import now_ms
from trinity.contract import (
    AGENTS,
    ARCHITECT,
    EXECUTION,
    EXECUTOR,
    FAILED_STATUSES,
    QUEUES,
    WITNESS,
)
from trinity.errors import TrinityError
from trinity.plan import MEMORY_LIMIT_MB
from trinity.settings import Settings
from trinity.stores import costs, run_logs, runs
from trinity.stores import journal as journal_store
from trinity.stores.costs import ERROR, SUCCESS, TIMEOUT, summarize

KINDS = ("cost", "patterns", "system")
FAILED_SHOWN = 5  # the failed plans and tasks the patterns dashboard lists
# The plan's refresh intervals, in simulated seconds.
SIM_REFRESH_S = {"cost": 5.0, "patterns": 60.0, "system": 300.0}
MIN_REFRESH_S = 0.5
# Waiting for a run (or for a store that failed to read): look again at least this often.
WAITING_REFRESH_S = 5.0
TITLES = {
    "cost": "TRINITY PROTOCOL - COST DASHBOARD",
    "patterns": "TRINITY PROTOCOL - PATTERN DETECTION",
    "system": "TRINITY PROTOCOL - SYSTEM HEALTH",
}


class DashboardError(TrinityError):
    """A store the dashboard reads is broken (corrupt, unreadable), or the run asked for
    is not recorded."""


# -- data objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    run: runs.Run
    ended_ms: int | None

    @property
    def real_elapsed_s(self) -> float:
        return ((self.ended_ms or now_ms()) - self.run.started_ms) / 1000


@dataclass(frozen=True)
class NoRun:
    """Nothing to show yet; ``message`` says why, plainly."""

    kind: str
    message: str
    time_scale: float = 1.0


@dataclass(frozen=True)
class CostView:
    state: RunState
    budget_usd: float
    totals: dict[str, Any]  # trinity.stores.costs.summarize of the run's ledger rows
    local_calls_by_agent: dict[str, int]
    ledger_found: bool


@dataclass(frozen=True)
class PatternView:
    state: RunState
    scoring: dict[str, Any]  # snapshots.detection_scores of the run's events
    stats: dict[str, Any] | None  # snapshots.pattern_stats now; None without a pattern store
    tasks_executed: dict[str, int]  # EXECUTOR outcome status -> tasks
    tasks_pending: int  # published by ARCHITECT, not yet applied by EXECUTOR
    plans_failed: int
    # the latest failed plans and tasks (at most FAILED_SHOWN), newest first, with why
    failed: tuple[tuple[str, str], ...] = ()  # (task id, reason)
    failed_total: int = 0
    external: dict[str, int] | None = None  # runs.progress's external counts


@dataclass(frozen=True)
class AgentBeat:
    name: str
    pid: int | None
    age_s: float
    alive: bool


@dataclass(frozen=True)
class SystemView:
    state: RunState
    sample: dict[str, Any] | None  # the run's latest metrics/system_metrics_*.json
    sample_name: str | None
    log_note: str | None  # why there is no sample, or which files were unreadable
    queues: dict[str, int]  # pending messages per stream (its slowest consumer), now
    databases_mb: dict[str, float | None]  # None: not created
    agents: list[AgentBeat]
    supervisord: str
    heartbeat_deadline_s: float


View = CostView | PatternView | SystemView | NoRun
# supervisord's state and its programs' states, asked when the system view is gathered.
SupervisordState = Callable[[], tuple[str, dict[str, str]]]


# -- reading ---------------------------------------------------------------------------


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection inside one read transaction; sqlite errors become a
    DashboardError naming the file."""
    try:
        with db.reading(path) as conn:
            yield conn
    except sqlite3.Error as exc:
        raise DashboardError(f"cannot read {path}: {exc}") from None


def _find_run(conn: sqlite3.Connection, run_id: str | None, path: Path) -> RunState | None:
    run = runs.get_run(conn, run_id) if run_id else runs.latest_run(conn)
    if run is None:
        if run_id:
            raise DashboardError(f"no run {run_id!r} recorded in {path}")
        return None
    return RunState(run, run.ended_ms)


def gather(kind: str, settings: Settings, run_id: str | None = None,
           supervisord: SupervisordState | None = None) -> View:
    """The data of dashboard ``kind`` for ``run_id`` (default: the latest run);
    ``supervisord`` says what supervisord and its programs are doing (the system view)."""
    if kind not in KINDS:
        raise ValueError(f"unknown dashboard {kind!r}")
    db = settings.messages_db
    if not db.exists():
        if run_id:
            raise DashboardError(f"no run {run_id!r}: there is no {db}")
        return NoRun(kind, f"no run data: {db} does not exist yet (start a run with "
                           "'trinity run')", settings.time_scale)
    with reading(db) as journal:
        state = _find_run(journal, run_id, db)
        if state is None:
            return NoRun(kind, f"no run data: {db} has no run recorded yet (start one with "
                               "'trinity run')", settings.time_scale)
        if kind == "cost":
            return _cost_view(settings, state)
        if kind == "patterns":
            return _pattern_view(settings, journal, state)
        return _system_view(settings, journal, state, supervisord)


def _cost_view(settings: Settings, state: RunState) -> CostView:
    rows: list[dict[str, Any]] = []
    found = settings.costs_db.exists()
    if found:
        with reading(settings.costs_db) as conn:
            rows = costs.calls(conn, state.run.run_id)
    return CostView(
        state=state,
        budget_usd=runs.budget_usd(state.run, settings.budget_usd),
        totals=summarize(rows),
        local_calls_by_agent=dict(Counter(str(r["agent"]) for r in rows if r["local"])),
        ledger_found=found,
    )


def _pattern_view(settings: Settings, journal: sqlite3.Connection,
                  state: RunState) -> PatternView:
    run = state.run
    stats = None
    if settings.patterns_db.exists():
        with reading(settings.patterns_db) as store:
            stats = measures.pattern_stats(journal, store, run.run_id, run.sim_elapsed_s,
                                           3600.0)
        scoring = stats["scoring"]
    else:
        scoring = measures.detection_scores(measures.run_truth(journal, run.run_id), {})
    outcomes = [o for o in runs.outcomes(journal, run.run_id) if o.delegate != WITNESS]
    executed = Counter(o.status for o in outcomes if o.delegate != ARCHITECT)
    failed = [o for o in outcomes if o.status in FAILED_STATUSES]
    progress = runs.progress(journal, run.run_id)
    return PatternView(
        state=state, scoring=scoring, stats=stats, tasks_executed=dict(executed),
        tasks_pending=_pending_tasks(journal, run.run_id),
        plans_failed=sum(o.delegate == ARCHITECT for o in outcomes),
        failed=tuple((o.task_id, runs.failure_reason(runs.outcome_product(journal, o.task_id)))
                     for o in failed[::-1][:FAILED_SHOWN]),
        failed_total=len(failed),
        external={k: progress[k] for k in ("external", "external_completed")},
    )


def _pending_tasks(journal: sqlite3.Connection, run_id: str) -> int:
    """Tasks ARCHITECT published for the run that EXECUTOR has not applied yet."""
    pending = 0
    for payload in journal_store.unapplied_payloads(journal, EXECUTION, EXECUTOR):
        try:
            task = json.loads(payload)
        except ValueError:
            continue
        pending += isinstance(task, dict) and task.get("run_id") == run_id
    return pending


def _sample_ok(sample: object) -> bool:
    """A sample with the figures the dashboard shows, of the types it shows them as."""
    if not isinstance(sample, dict):
        return False
    numbers = ("cpu_percent", "memory_mb", "disk_read_mb", "disk_write_mb")
    processes = sample.get("processes", {})
    return (all(isinstance(sample.get(k), int | float) and not isinstance(sample.get(k), bool)
                for k in numbers)
            and isinstance(processes, dict)
            and all(isinstance(p, dict) and isinstance(p.get("rss_mb", 0), int | float)
                    for p in processes.values()))


Sample = tuple[dict[str, Any] | None, str | None, str | None]


def latest_metrics(log_dir: Path, run_id: str) -> Sample:
    """(the run's latest system metrics sample, its file name, a note on what is missing
    or was unreadable); looked for in ``log_dir``, then where a later run moved the run's
    logs (``archive/<run_id>`` beside it, see ``run_logs.archive``)."""
    found = _latest_in(log_dir, run_id)
    archived = run_logs.archived(log_dir, run_id)
    if found[0] is None and archived.is_dir():
        moved = _latest_in(archived, run_id)
        return moved if moved[0] is not None else found
    return found


def _latest_in(log_dir: Path, run_id: str) -> Sample:
    folder = log_dir / run_logs.KINDS["metrics"][0]
    if not log_dir.is_dir():
        return None, None, f"log directory {log_dir} does not exist"
    if not folder.is_dir():
        return None, None, f"no metrics folder in {log_dir} yet"
    unreadable: list[str] = []
    for path in run_logs.snapshot_files(log_dir, "metrics"):
        sample = run_logs.read_json(path)
        if sample is None or not _sample_ok(sample):
            unreadable.append(path.name)
        elif sample.get("run_id") == run_id:
            skipped = f"{len(unreadable)} unreadable newer sample(s) skipped: " \
                      f"{', '.join(unreadable[:3])}" if unreadable else None
            return sample, path.name, skipped
    note = f"no system metrics sample of run {run_id} in {folder}"
    if unreadable:
        note += f" ({len(unreadable)} unreadable: {', '.join(unreadable[:3])})"
    return None, None, note


def _database_sizes(settings: Settings) -> dict[str, float | None]:
    sizes: dict[str, float | None] = {}
    for path in (settings.patterns_db, settings.messages_db, settings.costs_db):
        parts = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]
        # Unrounded: rounding here and again when shown can move a figure across a
        # boundary (0.74996 -> 0.750 -> "0.8" where the size is "0.7 MB").
        sizes[path.name] = (sum(p.stat().st_size for p in parts if p.exists()) / (1024 * 1024)
                            if path.exists() else None)
    return sizes


def _system_view(settings: Settings, journal: sqlite3.Connection, state: RunState,
                 supervisord_state: SupervisordState | None) -> SystemView:
    sample, name, note = latest_metrics(settings.log_dir, state.run.run_id)
    queues: dict[str, int] = {}
    for backlog in journal_store.backlogs(journal):  # each stream's slowest consumer
        queues[backlog.stream] = max(queues.get(backlog.stream, backlog.pending),
                                     backlog.pending)
    supervisord, programs = (supervisord_state() if supervisord_state is not None
                             else ("unknown (not asked)", {}))
    beats = [(b.agent, b.pid, b.last_ms) for b in runs.heartbeats(journal)]
    now = now_ms()
    deadline = settings.heartbeat_deadline_s
    agents = []
    for agent, pid, beat_ms in beats:
        age = (now - int(beat_ms)) / 1000
        # As `trinity status` judges it: a recent heartbeat, and supervisord (when it can
        # be asked) says the program is running.
        supervised = (supervisord.startswith("unknown")
                      or (supervisord == "running" and programs.get(agent) == "RUNNING"))
        agents.append(AgentBeat(str(agent), pid, age, age <= deadline and supervised))
    return SystemView(state=state, sample=sample, sample_name=name, log_note=note,
                      queues=queues, databases_mb=_database_sizes(settings), agents=agents,
                      supervisord=supervisord, heartbeat_deadline_s=deadline)


# -- rendering -------------------------------------------------------------------------


def duration(seconds: float) -> str:
    total = max(0, int(round(seconds)))
    return f"{total // 3600}h {total % 3600 // 60:02d}m {total % 60:02d}s"


def usd(value: float) -> str:
    return f"-${-value:,.4f}" if value < 0 else f"${value:,.4f}"


class _Sheet:
    """Lines laid out as the plan draws a dashboard: a title, a rule, labelled figures and
    indented sections."""

    def __init__(self, title: str, label_width: int) -> None:
        self.label_width = label_width
        self.lines: list[Text] = [Text(title, style="bold cyan"), Text("=" * 50)]

    def field(self, label: str, value: str | Text, style: str = "") -> None:
        self.lines.append(Text.assemble((f"{label}:".ljust(self.label_width), "bold"),
                                        value if isinstance(value, Text) else (value, style)))

    def section(self, title: str) -> None:
        self.lines += [Text(""), Text(f"{title}:", style="bold")]

    def row(self, name: str, value: str | Text, width: int, style: str = "") -> None:
        """An indented ``name``, padded to ``width`` and by two spaces at least."""
        self.lines.append(Text.assemble(f"  {name}".ljust(max(width, len(name) + 2) + 2),
                                        value if isinstance(value, Text) else (value, style)))

    def note(self, text: str, style: str = "yellow") -> None:
        self.lines.append(Text(text, style=style))

    def group(self) -> Group:
        return Group(*self.lines)


def _run_field(sheet: _Sheet, state: RunState) -> None:
    run = state.run
    sheet.field("RUN", f"{run.run_id} ({run.status}, time scale {run.time_scale:g}x)")


def render_no_run(view: NoRun) -> RenderableType:
    sheet = _Sheet(TITLES[view.kind], 16)
    sheet.note(view.message)
    return sheet.group()


def render_cost(view: CostView) -> RenderableType:
    run, totals = view.state.run, view.totals
    spent, budget = totals["total_cost_usd"], view.budget_usd
    sheet = _Sheet(TITLES["cost"], 16)
    _run_field(sheet, view.state)
    share = f" ({spent / budget:.1%})" if budget > 0 else " (no budget set)"
    sheet.field("TOTAL COST", f"{usd(spent)} / ${budget:,.2f}{share}",
                "red" if budget and spent > budget else "")
    sheet.field("ELAPSED", f"{duration(run.sim_elapsed_s)} / {duration(run.duration_s)}")
    sheet.field("REMAINING", f"{usd(budget - spent)} budget, "
                             f"{duration(run.duration_s - run.sim_elapsed_s)} time")
    if not view.ledger_found:
        sheet.note("no cost ledger yet: no model call has been made")
    sheet.section("BY AGENT")
    by_agent = totals["by_agent"]
    names = [*AGENTS, *sorted(set(by_agent) - set(AGENTS))]
    for name in names:
        group = by_agent.get(name)
        if group is None:
            sheet.row(name.upper(), f"{usd(0.0)} (no model calls)", 16)
            continue
        local = view.local_calls_by_agent.get(name, 0) / group["calls"]
        sheet.row(name.upper(), f"{usd(group['cost_usd'])} ({local:.0%} local, "
                                f"{group['calls']:,} calls)", 16)
    sheet.section("BY MODEL")
    models = sorted(totals["by_model"].items(),
                    key=lambda kv: (-kv[1]["cost_usd"], -kv[1]["calls"], kv[0]))
    width = max([22, *(len(m) + 2 for m, _ in models)])
    for model, group in models:
        tokens = group["input_tokens"] + group["output_tokens"]
        sheet.row(model, f"{usd(group['cost_usd'])} ({tokens:,} tokens)", width)
    if not models:
        sheet.row("(none yet)", "", width)
    status = totals["by_status"]
    sheet.lines.append(Text(""))
    sheet.field("CALLS", f"{totals['total_calls']:,} total ({status[SUCCESS]:,} success, "
                         f"{status[ERROR]:,} error, {status[TIMEOUT]:,} timeout)")
    rate = totals["success_rate"]
    sheet.field("SUCCESS RATE", "-" if rate is None else f"{rate:.1%}")
    return sheet.group()


def render_patterns(view: PatternView) -> RenderableType:
    scoring, stats = view.scoring, view.stats
    sheet = _Sheet(TITLES["patterns"], 21)
    _run_field(sheet, view.state)
    sheet.field("EVENTS PROCESSED", f"{scoring['events_classified']:,} / "
                                    f"{view.state.run.total_events:,} expected "
                                    f"({scoring['events_emitted']:,} emitted)")
    rate = scoring["detection_rate"]
    sheet.field("PATTERNS DETECTED", f"{scoring['detected']:,} / "
                                     f"{scoring['pattern_events_classified']:,}"
                                     + ("" if rate is None else f" ({rate:.1%})"))
    if scoring["noise_events_classified"]:
        sheet.field("NOISE EVENTS", f"{scoring['noise_events_classified']:,} classified, "
                                    f"{scoring['false_positives']:,} taken for a pattern")
    detections = stats["detections"] if stats else None
    signals = detections["total"] if detections else 0
    sheet.field("SIGNALS PUBLISHED", f"{signals:,} → improvement_queue")
    executed = sum(view.tasks_executed.values())
    failed = (f" ({view.plans_failed:,} plan{'' if view.plans_failed == 1 else 's'} failed)"
              if view.plans_failed else "")
    sheet.field("TASKS CREATED", f"{executed + view.tasks_pending:,} by ARCHITECT{failed}")
    statuses = ", ".join(f"{n:,} {s}" for s, n in sorted(view.tasks_executed.items()))
    sheet.field("TASKS EXECUTED", f"{executed:,} by EXECUTOR"
                                  + (f" ({statuses})" if statuses else ""))
    if view.external and view.external["external"]:
        sheet.field("EXTERNAL EVENTS", f"{view.external['external']:,} from trinity emit, "
                                       f"{view.external['external_completed']:,} with an outcome")
    if view.failed:
        sheet.section(f"FAILED ({view.failed_total:,}, latest first)")
        for task_id, why in view.failed:
            sheet.row(task_id, why[:60], 24, "red")
    if detections is None or stats is None:
        sheet.note("no pattern store yet: WITNESS has not started")
        return sheet.group()
    sheet.section("BY PATTERN TYPE")
    confidence = detections["average_confidence_by_type"]
    for pattern, count in detections["by_type"].items():
        conf = confidence.get(pattern)
        sheet.row(pattern, f"{count:>3} detections (avg conf: "
                           f"{'-' if conf is None else f'{conf:.2f}'})", 22)
    learning = stats["learning"]
    trend = learning["confidence_trend"]
    word = "improving" if trend > 0 else "declining" if trend < 0 else "flat"
    sheet.section("LEARNING")
    sheet.row("Patterns in store:", f"{learning['total_patterns']:,} total", 24)
    sheet.row("New in the last hour:", f"{learning['new_patterns_this_hour']:,}", 24)
    sheet.row("Cross-session matches:", f"{learning['cross_session_matches']:,}", 24)
    sheet.row("Confidence trending:", f"{trend:+.3f} ({word})", 24)
    corrections = learning.get("corrections")  # absent from snapshots made before them
    if corrections is not None:
        sheet.row("Corrections:", measures.corrections_line(corrections), 24)
    return sheet.group()


def _memory_fields(sheet: _Sheet, sample: dict[str, Any]) -> None:
    """The largest process against the per-process limit (what the plan's 500 MB applies
    to), and all processes together (PSS: shared model pages counted once)."""
    processes = sample.get("processes", {})
    largest = max(processes.items(), key=lambda kv: kv[1].get("rss_mb", 0), default=None)
    peak = sample.get("memory_max_process_rss_mb")
    if isinstance(peak, int | float) and largest is not None:
        sheet.field("MEMORY", f"{peak:.0f} MB / {MEMORY_LIMIT_MB:.0f} MB limit "
                              f"({peak / MEMORY_LIMIT_MB:.1%}), {largest[0]}",
                    "red" if peak >= MEMORY_LIMIT_MB else "")
    count = f"{len(processes)} process" + ("" if len(processes) == 1 else "es")
    sheet.field("MEMORY (all)", f"{sample['memory_mb']:,.0f} MB PSS in {count}")


def _agent_order(agent: AgentBeat) -> tuple[int, str]:
    names = list(AGENTS)
    return (names.index(agent.name) if agent.name in names else len(names), agent.name)


def render_system(view: SystemView) -> RenderableType:
    run, sample = view.state.run, view.sample
    sheet = _Sheet(TITLES["system"], 17)
    _run_field(sheet, view.state)
    sheet.field("UPTIME", f"{duration(run.sim_elapsed_s)} simulated "
                          f"({duration(view.state.real_elapsed_s)} real)")
    if sample is None:
        sheet.note(f"no system metrics yet: {view.log_note}")
    else:
        _memory_fields(sheet, sample)
        minutes = run.interval_s("metrics") / 60
        sheet.field("CPU (avg)", f"{sample['cpu_percent']:.1f}% (last {minutes:g} min)")
        sheet.field("DISK I/O", f"{sample['disk_read_mb']:,.1f} MB read, "
                                f"{sample['disk_write_mb']:,.1f} MB write")
        sampled = sample.get("sampled_sim_elapsed_s", sample.get("sim_elapsed_s"))
        when = f" (simulated {duration(sampled)})" if isinstance(sampled, int | float) else ""
        sheet.field("SAMPLE", f"{view.sample_name}{when}")
        if view.log_note:
            sheet.note(view.log_note)
    sheet.section("MESSAGE QUEUES")
    order = [q for q in QUEUES if q in view.queues] + sorted(set(view.queues) - set(QUEUES))
    for stream in order:
        sheet.row(stream, f"{view.queues[stream]:>3} pending", 22)
    if not order:
        sheet.row("(no queue declared yet)", "", 22)
    sheet.section("DATABASE SIZES")
    for name, size in view.databases_mb.items():
        sheet.row(name, "not created yet" if size is None else f"{size:.1f} MB", 22)
    sheet.section(f"AGENTS ALIVE (supervisord {view.supervisord})")
    for agent in sorted(view.agents, key=_agent_order):
        mark = Text("✓", style="bold green") if agent.alive else Text("✗", style="bold red")
        age = f"{agent.age_s:.1f}s" if agent.age_s < 60 else duration(agent.age_s)
        sheet.row(agent.name.upper(), Text.assemble(mark, f" (last heartbeat: {age} ago)"), 14)
    if not view.agents:
        sheet.note("no heartbeat recorded yet")
    return sheet.group()


def render(view: View) -> RenderableType:
    if isinstance(view, CostView):
        return render_cost(view)
    if isinstance(view, PatternView):
        return render_patterns(view)
    if isinstance(view, SystemView):
        return render_system(view)
    return render_no_run(view)


# -- showing ---------------------------------------------------------------------------


def refresh_interval_s(kind: str, time_scale: float) -> float:
    """The plan's refresh interval (simulated) in real seconds at ``time_scale``."""
    return max(MIN_REFRESH_S, SIM_REFRESH_S[kind] / time_scale)


def live_frame(kind: str, settings: Settings, run_id: str | None,
               supervisord: SupervisordState | None = None) -> tuple[RenderableType, float]:
    """One refresh of a live dashboard and the real seconds until the next; a store that
    cannot be read is shown, not raised: it may be locked or not written yet."""
    try:
        view = gather(kind, settings, run_id, supervisord)
    except DashboardError as exc:
        interval = min(WAITING_REFRESH_S, refresh_interval_s(kind, settings.time_scale))
        return Group(Text(TITLES[kind], style="bold cyan"), Text("=" * 50),
                     Text(f"error: {exc}", style="bold red")), interval
    if isinstance(view, NoRun):
        interval = min(WAITING_REFRESH_S, refresh_interval_s(kind, view.time_scale))
        scale = view.time_scale
    else:
        scale = view.state.run.time_scale
        interval = refresh_interval_s(kind, scale)
    footer = Text(f"refreshing every {interval:g} s real ({SIM_REFRESH_S[kind]:g} s simulated "
                  f"at time scale {scale:g}x); Ctrl-C to quit", style="dim")
    return Group(render(view), Text(""), footer), interval


def show_live(frame: Callable[[], tuple[RenderableType, float]], console: Console, *,
              refreshes: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Redraw ``frame()`` in place until Ctrl-C (or ``refreshes`` times)."""
    done = 0
    with Live(console=console, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as screen:
        try:
            while True:
                renderable, interval = frame()
                screen.update(renderable, refresh=True)
                done += 1
                if refreshes is not None and done >= refreshes:
                    return
                sleep(interval)
        except KeyboardInterrupt:
            return


def show_once(kind: str, settings: Settings, run_id: str | None,
              supervisord: SupervisordState | None, console: Console) -> None:
    console.print(render(gather(kind, settings, run_id, supervisord)))


# -- command ---------------------------------------------------------------------------
