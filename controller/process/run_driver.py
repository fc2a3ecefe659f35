"""The active run, driven turn by turn: events on its clock, checkpoints, snapshots,
anomaly rules, budget alerts, and its end.

The controller makes a :class:`RunDriver` when it finds an active run (at start, after
a restart: simulated time continues from the run's last checkpoint, downtime is not run
time) and drops it when the run ends; everything here exists only while a run does.
Each :meth:`RunDriver.drive` emits the cycles that are due (each with its noise events
and their ground truth, in one transaction: a cycle is emitted entirely or not at all),
checkpoints simulated time, writes every snapshot that is due (system metrics every
metrics interval, cost and pattern statistics every snapshot interval) and evaluates
the anomaly rules on what they measured, checks the budget, and ends the run once its
duration has passed and every event has its outcome (or once outcomes stop arriving
for ``DRAIN_STALL_S``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import psutil

from trinity import measures
from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.clock import ScaledClock, now_ms
from trinity.contract import (
    ARCHITECT,
    CONTROLLER,
    EXECUTOR,
    MODEL_SERVER_COMMAND,
    MODELS,
    NONE,
    TELEMETRY,
    Alert,
)
from trinity.controller.process import snapshots
from trinity.controller.process.heartbeats import HeartbeatMonitor
from trinity.controller.process.metrics import MetricsSampler
from trinity.controller.process.rules import Rules
from trinity.controller.process.scenario import (
    ScenarioDataError,
    event_for_cycle,
    noise_for_cycle,
    read_scenario,
)
from trinity.db import open_readonly
from trinity.errors import JournalError
from trinity.process import store_named
from trinity.settings import Settings
from trinity.stores import patterns as pattern_store
from trinity.stores import run_logs, runs
from trinity.stores.costs import CostLedger, crossed_thresholds

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 0.5
# After the last event, the run ends "timed out" only if no outcome arrives for this
# long: model calls can leave a long but moving backlog.
DRAIN_STALL_S = 300.0
BUDGET_CHECK_EVERY_S = 1.0
SNAPSHOT_KINDS = ("metrics", "costs", "patterns")
# An agent's memory is its baseline for growth once it has applied this many messages:
# the first model calls grow llama.cpp's buffers to their working size (measured: +10 %
# over the first three calls, flat after).
WARM_AFTER_MESSAGES = 3


class Host(Protocol):
    """What the driver needs of the controller it runs in."""

    settings: Settings
    journal: Journal
    monitor: HeartbeatMonitor

    def send(self, messages: list[Message]) -> None: ...

    def cost_ledger(self) -> CostLedger: ...

    def raise_alert(self, alert: Alert) -> None: ...

    def alert_database_error(self, database: Path, exc: BaseException, doing: str) -> None: ...


def model_server_pid(pid_file: Path) -> int | None:
    """The shared model server's pid from its pid file, if that process is running it (a
    pid file left by a killed server may name a pid reused since)."""
    try:
        pid = int(pid_file.read_text(encoding="utf-8").strip())
        cmdline = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if MODEL_SERVER_COMMAND in cmdline else None


def _applied(beat: dict[str, Any]) -> int:
    """Messages the agent's heartbeat says it applied (0 if it says nothing usable)."""
    counters = beat.get("counters")
    applied = counters.get("applied") if isinstance(counters, dict) else None
    return applied if isinstance(applied, int) and not isinstance(applied, bool) else 0


class RunDriver:
    def __init__(self, run: runs.Run, host: Host, sampler: MetricsSampler,
                 monotonic: Callable[[], float]) -> None:
        self.run = run
        self.host = host
        self.settings = host.settings
        self.sampler = sampler
        self.monotonic = monotonic
        # Simulated time continues from the last checkpoint: downtime is not run time.
        self.clock = ScaledClock(run.time_scale, sim_offset_s=run.sim_elapsed_s)
        sampler.set_time_scale(run.time_scale)
        self.rules = Rules(run.run_id)
        self.variants: dict[str, list[dict[str, Any]]] | None = None
        if run.config.get("scenario"):
            try:
                self.variants = read_scenario(Path(run.config["scenario"]))
            except ScenarioDataError as exc:  # checked at start; changed since
                log.error("%s: using the shipped scenario instead", exc)
        self.next_snapshot = dict.fromkeys(SNAPSHOT_KINDS, 0)
        self.next_snapshot.update(runs.next_snapshots(host.journal.conn, run.run_id))
        self._next_checkpoint = 0.0
        self._next_budget_check = 0.0
        self._drain_progress: tuple[int, float] | None = None
        self._last_growth: float | None = None
        self.ended = False

    def sim_elapsed_s(self) -> float:
        return self.clock.sim_elapsed_s()

    def tag(self, alert: Alert) -> Alert:
        """``alert`` tagged with this run and its simulated time now."""
        return alert.in_run(self.run.run_id, round(self.clock.sim_elapsed_s(), 3))

    def drive(self, now: float) -> None:
        """One turn of the run's work; ``ended`` is set once the run is over."""
        if now >= self._next_budget_check:
            self._next_budget_check = now + BUDGET_CHECK_EVERY_S
            try:
                self._check_budget()
            except sqlite3.Error as exc:  # the run goes on; the budget is checked again
                self.host.alert_database_error(self.settings.costs_db, exc,
                                               "checking the budget")
        run, sim = self.run, self.clock.sim_elapsed_s()
        conn = self.host.journal.conn
        state = runs.progress(conn, run.run_id)
        next_cycle = state["last_cycle"] + 1
        if next_cycle <= run.total_cycles and (next_cycle - 1) * run.event_interval_s <= sim:
            self._emit(next_cycle, sim)
        if now >= self._next_checkpoint:
            self._next_checkpoint = now + CHECKPOINT_EVERY_S
            runs.checkpoint(conn, run.run_id, min(sim, run.duration_s))
        self._snapshots(sim)
        if sim < run.duration_s or state["emitted"] < run.total_events:
            return
        if self._drain_progress is None or self._drain_progress[0] != state["completed"]:
            self._drain_progress = (state["completed"], now)
        if state["completed"] >= state["emitted"]:
            self._end(runs.COMPLETED, state)
        elif now - self._drain_progress[1] > DRAIN_STALL_S:
            self._end(runs.TIMED_OUT, state)

    def _check_budget(self) -> None:
        """Budget alerts from the ledger's total for the run; keyed, so each fires once
        per run even across controller restarts."""
        run = self.run
        budget = runs.budget_usd(run, self.settings.budget_usd)
        spent = self.host.cost_ledger().spent_usd(run.run_id)
        for pct in crossed_thresholds(spent, budget):
            exceeded = pct >= 100
            self.host.raise_alert(Alert(
                "budget_exceeded" if exceeded else "budget_threshold",
                "error" if exceeded else "warning",
                f"{'budget exceeded' if exceeded else f'{pct}% of budget consumed'}: "
                f"${spent:.4f} of ${budget:.2f}" + (" (the run continues)" if exceeded else ""),
                alert_id=f"budget/{run.run_id}/{pct}",
                details={"threshold_pct": pct, "spent_usd": round(spent, 6),
                         "budget_usd": budget}))

    def _emit(self, cycle: int, sim: float) -> None:
        """The cycle's event and its noise events, journaled with their ground truth in one
        transaction: a cycle is emitted entirely or not at all."""
        run = self.run
        category, fields = event_for_cycle(cycle, run.scenario_seed, self.variants)
        batch = [(0, category, fields)] + [
            (k, NONE, noise) for k, noise in enumerate(
                noise_for_cycle(cycle, run.scenario_seed, run.noise_events, self.variants),
                start=1)]
        with self.host.journal.transaction() as tx:
            for noise, truth, body in batch:
                event_id = f"{run.run_id}/c{cycle:03d}" + (f"/n{noise}" if noise else "")
                event = {"event_id": event_id, "run_id": run.run_id, "cycle": cycle, **body}
                tx.publish(TELEMETRY, encode_payload(event), key=event_id)
                runs.record_event(tx.conn, run.run_id,
                                  runs.Event(event_id, cycle, noise, truth, now_ms(), sim))
        self.host.send(tx.published)
        log.info("emitted cycle %d (%s)", cycle, category,
                 extra={"event_id": f"{run.run_id}/c{cycle:03d}", "noise_events": len(batch) - 1})

    # -- snapshots and anomaly rules -------------------------------------------

    def _snapshots(self, sim: float) -> None:
        """Write every snapshot that is due (scheduled at idx * interval < duration)."""
        run = self.run
        for kind in SNAPSHOT_KINDS:
            interval = run.interval_s(kind)
            due: list[int] = []
            while True:
                idx = self.next_snapshot[kind] + len(due)
                if idx * interval > sim or idx * interval >= run.duration_s:
                    break
                due.append(idx)
            if not due:
                continue
            try:
                body = self._measure(kind, sim)
            except (sqlite3.Error, JournalError) as exc:
                self.host.alert_database_error(self._database_of(exc, kind), exc,
                                               f"writing {kind} snapshot")
                continue
            for idx in due:
                at = idx * interval
                path = run_logs.snapshot_path(self.settings.log_dir, kind, at)
                run_logs.write_json(path, {**snapshots.header(run.run_id, at, sim), **body})
                with self.host.journal.transaction() as tx:
                    runs.record_snapshot(tx.conn, run.run_id, kind, idx, at, str(path))
            self.next_snapshot[kind] = due[-1] + 1

    def _database_of(self, exc: BaseException, kind: str) -> Path:
        named = store_named(str(exc), self.settings)
        if named is not None and named != self.settings.messages_db:
            return named
        return {"costs": self.settings.costs_db,
                "patterns": self.settings.patterns_db}.get(kind, self.settings.messages_db)

    def _measure(self, kind: str, sim: float) -> dict[str, Any]:
        run = self.run
        if kind == "metrics":
            return self._metrics(sim)
        if kind == "costs":
            ledger = self.host.cost_ledger()
            return snapshots.cost_snapshot(ledger.totals(run.run_id),
                                           ledger.spent_since(run.run_id, sim - 3600),
                                           runs.budget_usd(run, self.settings.budget_usd))
        stats = self._pattern_stats(sim)
        stats["memory_growth_pct_per_hour"] = self._last_growth
        return stats

    def _pattern_stats(self, sim: float) -> dict[str, Any]:
        conn = (open_readonly(self.settings.patterns_db)
                if self.settings.patterns_db.exists() else None)
        journal = self.host.journal.conn
        try:
            # WITNESS has not started yet, or has created the file but not yet its tables
            if conn is None or not pattern_store.has_schema(conn):
                return measures.empty_pattern_stats(measures.run_truth(journal,
                                                                       self.run.run_id))
            return measures.pattern_stats(journal, conn, self.run.run_id, sim,
                                          self.run.interval_s("patterns"))
        finally:
            if conn is not None:
                conn.close()

    def _metrics(self, sim: float) -> dict[str, Any]:
        monitor, settings = self.host.monitor, self.settings
        pids = {name: h.pid for name, h in monitor.agents.items() if h.pid is not None}
        pids[CONTROLLER] = os.getpid()
        model_server = model_server_pid(settings.model_server_pid_file)
        if model_server is not None:
            pids[MODELS] = model_server
        queues: dict[str, int] = {}
        for backlog in self.host.journal.backlogs():
            queues[backlog.stream] = max(queues.get(backlog.stream, 0), backlog.pending)
        warm = {CONTROLLER} | {
            name for name, h in monitor.agents.items()
            if _applied(h.last_payload) >= WARM_AFTER_MESSAGES}
        if warm & {ARCHITECT, EXECUTOR}:  # the model server has answered their calls
            warm.add(MODELS)
        sample = self.sampler.sample(pids, sim, queues=queues, warm=warm, databases={
            path.name: path for path in (settings.patterns_db, settings.messages_db,
                                         settings.costs_db)})
        sample["sim_elapsed_s"] = round(sim, 1)
        sample["agents_alive"] = {name: h.responsive for name, h in monitor.agents.items()}
        self._last_growth = sample["memory_growth_pct_per_hour"]
        self._evaluate_rules(sim, sample)
        return sample

    def _evaluate_rules(self, sim: float, sample: dict[str, Any]) -> None:
        """The anomaly rules, on the sample just measured and on the run's records."""
        found = self.rules.backlog(sample["queues"], sim)
        found += self.rules.memory(
            {name: p["rss_mb"] for name, p in sample["processes"].items()},
            self.sampler.hourly_growth(sim), sim)
        try:
            found += self.rules.cost_spike(
                self.host.cost_ledger().spent_since(self.run.run_id, sim - 3600), sim)
        except sqlite3.Error as exc:
            self.host.alert_database_error(self.settings.costs_db, exc,
                                           "reading the cost ledger")
        try:
            found += self.rules.detection(self._pattern_stats(sim)["scoring"], sim)
        except sqlite3.Error as exc:
            self.host.alert_database_error(self.settings.patterns_db, exc,
                                           "reading the pattern store")
        for alert in found:
            self.host.raise_alert(alert)

    def _end(self, status: str, state: dict[str, int]) -> None:
        # The last periodic checkpoint may be up to CHECKPOINT_EVERY_S of real time old:
        # the ended run records all the simulated time it ran.
        conn = self.host.journal.conn
        runs.checkpoint(conn, self.run.run_id, min(self.clock.sim_elapsed_s(),
                                                   self.run.duration_s))
        runs.finish(conn, self.run.run_id, status)
        log.info("run %s %s: %s", self.run.run_id, status, state)
        if status != runs.COMPLETED:
            self.host.raise_alert(Alert(
                "run_incomplete", "error",
                f"{state['emitted'] - state['completed']} events without an outcome after the "
                "drain timeout", details=state))
        self.ended = True
