"""The controller process.

Each loop turn it: writes journaled alerts to ``alerts.log`` (and posts each to the
optional webhook); records agent heartbeats and raises "agent silent" after
``heartbeat_max_missed`` missed beats (and "agent recovered" when they resume),
restarting an agent that is hung rather than dead through supervisord within a restart
intensity (``healing.py``); emits the active run's due events on ``telemetry_stream``
on the run's compressible clock; checkpoints simulated time; raises the budget alerts
from the cost ledger's totals (50/75/90 % and exceeded, each once per run); ends the
run once its duration has passed and every event has its outcome (or once outcomes
stop arriving for ``DRAIN_STALL_S``); writes the plan's snapshots on simulated time
(system metrics every metrics interval, cost and pattern statistics every snapshot
interval) and evaluates the anomaly rules on what they measured; and prunes the
journal. A database it cannot read or write is a ``database_error`` alert, never the
end of the controller.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

from trinity import records
from trinity.agents.base import BaseProcess, store_advice, store_named, store_opened_by
from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.topology import ALERTS, TELEMETRY
from trinity.clock import ScaledClock, now_ms
from trinity.controller import runs, snapshots
from trinity.controller.alerts import AlertLog, make_alert
from trinity.controller.healing import Healer
from trinity.controller.heartbeats import HeartbeatMonitor, heartbeat_pid
from trinity.controller.metrics import MetricsSampler
from trinity.controller.prometheus import start_exporter
from trinity.controller.rules import Alert, Rules
from trinity.controller.scenario import (
    CATEGORIES,
    ScenarioDataError,
    event_for_cycle,
    noise_for_cycle,
    read_scenario,
)
from trinity.controller.watchdog import AliveFile, alive_path
from trinity.costs import CostLedger, crossed_thresholds
from trinity.errors import JournalError, MalformedMessage

log = logging.getLogger(__name__)

AGENTS = ("witness", "architect", "executor")
CHECKPOINT_EVERY_S = 0.5
PRUNE_EVERY_S = 30.0
# After the last event, the run ends "timed out" only if no outcome arrives for this
# long: model calls can leave a long but moving backlog.
DRAIN_STALL_S = 300.0
BUDGET_CHECK_EVERY_S = 1.0
# One database_error alert per database per this many real seconds while it persists.
DB_ERROR_REPEAT_S = 60.0
SNAPSHOT_KINDS = ("metrics", "costs", "patterns")
# An agent's memory is its baseline for growth once it has applied this many messages:
# the first model calls grow llama.cpp's buffers to their working size (measured: +10 %
# over the first three calls, flat after).
WARM_AFTER_MESSAGES = 3


def _wire_text(value: object, limit: int = 500) -> str:
    """A heartbeat's text for an alert: bounded, lone surrogates escaped (UTF-8 clean)."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _applied(beat: dict[str, Any]) -> int:
    """Messages the agent's heartbeat says it applied (0 if it says nothing usable)."""
    counters = beat.get("counters")
    applied = counters.get("applied") if isinstance(counters, dict) else None
    return applied if isinstance(applied, int) and not isinstance(applied, bool) else 0


class Controller(BaseProcess):
    name: ClassVar[str] = "controller"
    publishes: ClassVar[tuple[str, ...]] = (TELEMETRY, ALERTS)
    sends_heartbeats: ClassVar[bool] = False
    isolate_each_message: ClassVar[bool] = False

    def initialize(self) -> None:
        super().initialize()
        self.alert_log = AlertLog(self.settings.log_dir / "alerts.log")
        self.monitor = HeartbeatMonitor(
            AGENTS, self.settings.heartbeat_deadline_s, self.clock.monotonic(),
            startup_grace_s=self.settings.startup_grace_s,
        )
        self.healer = Healer.from_settings(self.settings)
        self.journal.conn.execute(
            "CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, pid INTEGER,"
            " last_heartbeat_ms INTEGER NOT NULL, heartbeat TEXT NOT NULL)"
        )
        self.active: runs.Run | None = None
        self.active_clock: ScaledClock | None = None
        self._next_checkpoint = 0.0
        self._next_prune = self.clock.monotonic() + PRUNE_EVERY_S
        self._drain_progress: tuple[int, float] | None = None
        self.ledger: CostLedger | None = None  # opened on first use (see _cost_ledger)
        self._next_budget_check = 0.0
        self.sampler = MetricsSampler()
        self.notifier: Any = None
        if self.settings.alert_webhook:
            from trinity.controller.webhook import WebhookNotifier

            self.notifier = WebhookNotifier(self.settings.alert_webhook)
        self._db_error_at: dict[str, float] = {}
        self._last_growth: float | None = None
        self._last_tick = self.clock.monotonic()
        self.alive = AliveFile(alive_path(self.settings))
        self._load_run()
        try:
            self._cost_ledger()
        except sqlite3.Error as exc:
            self.alert_database_error(self.settings.costs_db, exc, "opening the cost ledger")
        # Prometheus /metrics on loopback (None: TRINITY_METRICS_PORT=0, or port in use).
        self.exporter = start_exporter(self.settings, {self.name: os.getpid()})

    def _load_run(self) -> None:
        records.ensure_schema(self.journal.conn)
        run = runs.active_run(self.journal.conn)
        if run is None:
            log.info("no active run: monitoring only")
            return
        self.active = run
        # Continue simulated time from the last checkpoint: downtime is not run time.
        self.active_clock = ScaledClock(run.time_scale, sim_offset_s=run.sim_elapsed_s)
        self.sampler.set_time_scale(run.time_scale)
        self.rules = Rules(run.run_id)
        self.variants: dict[str, list[dict[str, Any]]] | None = None
        if run.config.get("scenario"):
            try:
                self.variants = read_scenario(Path(run.config["scenario"]))
            except ScenarioDataError as exc:  # checked at start; changed since
                log.error("%s: using the shipped scenario instead", exc)
        self._next_snapshot = {kind: 0 for kind in SNAPSHOT_KINDS}
        for kind, last in self.journal.conn.execute(
                "SELECT kind, max(idx) FROM snapshots WHERE run_id=? GROUP BY kind",
                (run.run_id,)):
            self._next_snapshot[kind] = int(last) + 1
        log.info("continuing run %s at simulated %.0f s", run.run_id, run.sim_elapsed_s)

    def shutdown(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
        if self.ledger is not None:
            self.ledger.close()
        if self.notifier is not None:
            self.notifier.close()
        super().shutdown()

    # -- messages ---------------------------------------------------------

    def handle(self, msg: Message, tx: Transaction) -> None:
        if msg.stream == ALERTS:
            alert = self.alert_log.write(msg)
            if alert is not None:
                self._announce(alert)

    def _announce(self, alert: dict[str, Any]) -> None:
        log.warning("alert %s (%s): %s", alert.get("kind"), alert.get("severity"),
                    str(alert.get("message"))[:500], extra={"alert_id": alert.get("alert_id")})
        if self.notifier is not None:
            self.notifier.submit(alert)

    def handle_ephemeral(self, msg: Message) -> None:
        try:
            beat = msg.json()
        except MalformedMessage as exc:
            self._dead_letter(msg, exc.reason)
            return
        agent = beat.get("agent")
        if not isinstance(agent, str) or agent not in self.monitor.agents:
            self._dead_letter(msg, f"heartbeat from unknown agent {agent!r}")
            return
        failure = beat.get("database_error")
        if isinstance(failure, dict):
            # Text from the wire goes into an alert: no lone surrogate (not UTF-8), bounded.
            error = _wire_text(failure.get("error", "?"))
            # The store the agent names, else the one its error message names.
            named = failure.get("database")
            database = (Path(Path(_wire_text(named)).name)
                        if isinstance(named, str) and named.strip()
                        else self._database_named(error))
            doing = failure.get("doing")
            self.alert_database_error(
                database, RuntimeError(error),
                _wire_text(doing) if isinstance(doing, str) else f"{agent} was applying messages",
                agent=agent)
        if self.monitor.beat(agent, beat, self.clock.monotonic()):
            self.raise_alert("agent_recovered", "info", f"{agent} is sending heartbeats again",
                             agent=agent)
        with self.journal.transaction() as tx:
            tx.conn.execute(
                "INSERT INTO agents(name, pid, last_heartbeat_ms, heartbeat) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET pid=excluded.pid,"
                " last_heartbeat_ms=excluded.last_heartbeat_ms, heartbeat=excluded.heartbeat",
                (agent, heartbeat_pid(beat), now_ms(), json.dumps(beat)),
            )

    def _dead_letter(self, msg: Message, reason: str) -> None:
        with self.journal.transaction() as tx:
            tx.dead_letter(self.name, reason, msg.payload, stream=msg.stream, msg_id=msg.msg_id)
        self.node.counters.dead_lettered += 1

    def raise_alert(self, kind: str, severity: str, message: str, **details: Any) -> None:
        alert = make_alert(kind, severity, message, **details)
        if self.active is not None and self.active_clock is not None:
            alert["run_id"] = self.active.run_id
            alert["sim_elapsed_s"] = round(self.active_clock.sim_elapsed_s(), 3)
        try:
            self.node.publish(ALERTS, alert, key=alert["alert_id"])
        except JournalError as exc:
            # The journal itself is failing: write the alert directly, so it is not lost;
            # alerts.log keeps each alert id once should the journal deliver it later.
            log.error("cannot journal alert %s: %s", alert["alert_id"], exc)
            if self.alert_log.write_alert(alert, source=self.name):
                self._announce(alert)
            self._free_journal_lock(exc)

    def _raise(self, alert: Alert) -> None:
        self.raise_alert(alert.kind, alert.severity, alert.message, agent=alert.agent,
                         alert_id=alert.alert_id, **alert.details)

    def alert_database_error(self, database: Path, exc: BaseException, doing: str,
                       agent: str | None = None) -> None:
        """A ``database_error`` alert, at most one per process and database per
        DB_ERROR_REPEAT_S."""
        now = self.clock.monotonic()
        key = f"{agent or self.name}:{database.name}"
        if now - self._db_error_at.get(key, -DB_ERROR_REPEAT_S) < DB_ERROR_REPEAT_S:
            return
        self._db_error_at[key] = now
        log.error("database error on %s while %s: %s", database.name, doing, exc)
        advice = store_advice(database.name, str(exc))
        self.raise_alert("database_error", "error",
                         f"{database.name}: {exc} (while {doing})"
                         + (f": {advice}" if advice else ""), agent=agent or self.name,
                         database=database.name, error=str(exc)[:500],
                         error_type=type(exc).__name__, **({"advice": advice} if advice else {}))

    def on_database_error(self, exc: BaseException) -> None:
        database = store_opened_by(exc, self.settings) or self._database_named(str(exc))
        if database == self.settings.messages_db:
            self._free_journal_lock(exc)
        self.alert_database_error(database, exc, "running its loop")

    def _free_journal_lock(self, exc: BaseException) -> None:
        """The journal was locked past its busy timeout: an agent stopped (SIGSTOP) in the
        middle of a transaction holds that lock for as long as it stays stopped, and no
        alert can be journaled meanwhile. Restart such an agent now."""
        if "locked" in str(exc):
            for alert in self.healer.heal_stopped(self.monitor, self.clock.monotonic()):
                self._raise(alert)

    def _database_named(self, text: str) -> Path:
        """The database an error message names (the journal when it names none)."""
        return store_named(text, self.settings) or self.settings.messages_db

    # -- periodic work ------------------------------------------------------

    def tick(self) -> None:
        self.alive.touch()  # for the watchdog in supervisord's listener
        now = self.clock.monotonic()
        if now - self._last_tick > self.settings.heartbeat_interval_s:
            # This turn was long (e.g. waiting on a locked database): heartbeats that came
            # in meanwhile are still unread, and an agent is not silent for our delay.
            self.node.receive(timeout_ms=0)
            inbox, self.node.ephemeral_inbox = self.node.ephemeral_inbox, []
            for msg in inbox:
                self.handle_ephemeral(msg)
        self._last_tick = now
        silent = self.monitor.newly_silent(now)
        # Restart first: a hung agent may hold the journal's write lock these alerts need.
        healed = self.healer.heal(self.monitor, now)
        for agent, quiet in silent:
            self.raise_alert(
                "agent_silent", "error",
                f"{agent} sent no heartbeat for {quiet:.1f} s "
                f"({self.settings.heartbeat_max_missed} missed)",
                agent=agent, silent_s=round(quiet, 3),
            )
        for alert in healed:
            self._raise(alert)
        if self.active is not None and now >= self._next_budget_check:
            self._next_budget_check = now + BUDGET_CHECK_EVERY_S
            try:
                self._check_budget(self.active)
            except sqlite3.Error as exc:  # the run goes on; the budget is checked again
                self.alert_database_error(self.settings.costs_db, exc, "checking the budget")
        if self.active is not None:
            self._drive_run(now)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            self.journal.prune()

    def _drive_run(self, now: float) -> None:
        assert self.active is not None and self.active_clock is not None
        run, sim = self.active, self.active_clock.sim_elapsed_s()
        state = runs.progress(self.journal.conn, run.run_id)
        next_cycle = state["last_cycle"] + 1
        if next_cycle <= run.total_cycles and (next_cycle - 1) * run.event_interval_s <= sim:
            self._emit(run, next_cycle, sim)
        if now >= self._next_checkpoint:
            self._next_checkpoint = now + CHECKPOINT_EVERY_S
            runs.checkpoint(self.journal.conn, run.run_id, min(sim, run.duration_s))
        self._snapshots(run, sim)
        if sim < run.duration_s or state["emitted"] < run.total_events:
            return
        if self._drain_progress is None or self._drain_progress[0] != state["completed"]:
            self._drain_progress = (state["completed"], now)
        if state["completed"] >= state["emitted"]:
            self._end_run(runs.COMPLETED, state)
        elif now - self._drain_progress[1] > DRAIN_STALL_S:
            self._end_run(runs.TIMED_OUT, state)

    def _cost_ledger(self) -> CostLedger:
        """The cost ledger, opened on first use and again after a failed open (a corrupt
        or locked file): the controller runs on without it meanwhile, alerting."""
        if self.ledger is None:
            self.ledger = CostLedger(self.settings.costs_db)
        return self.ledger

    def _check_budget(self, run: runs.Run) -> None:
        """Budget alerts from the ledger's total for the run; keyed, so each fires once
        per run even across controller restarts."""
        budget = runs.budget_usd(run, self.settings.budget_usd)
        spent = self._cost_ledger().spent_usd(run.run_id)
        for pct in crossed_thresholds(spent, budget):
            exceeded = pct >= 100
            self.raise_alert(
                "budget_exceeded" if exceeded else "budget_threshold",
                "error" if exceeded else "warning",
                f"{'budget exceeded' if exceeded else f'{pct}% of budget consumed'}: "
                f"${spent:.4f} of ${budget:.2f}" + (" (the run continues)" if exceeded else ""),
                alert_id=f"budget/{run.run_id}/{pct}", threshold_pct=pct,
                spent_usd=round(spent, 6), budget_usd=budget,
            )

    def _emit(self, run: runs.Run, cycle: int, sim: float) -> None:
        """The cycle's event and its noise events, journaled with their ground truth in one
        transaction: a cycle is emitted entirely or not at all."""
        category, fields = event_for_cycle(cycle, run.scenario_seed, self.variants)
        batch = [(0, category, fields)] + [
            (k, "none", noise) for k, noise in enumerate(
                noise_for_cycle(cycle, run.scenario_seed, run.noise_events, self.variants),
                start=1)]
        with self.journal.transaction() as tx:
            for noise, truth, body in batch:
                event_id = f"{run.run_id}/c{cycle:03d}" + (f"/n{noise}" if noise else "")
                event = {"event_id": event_id, "run_id": run.run_id, "cycle": cycle, **body}
                tx.publish(TELEMETRY, encode_payload(event), key=event_id)
                tx.conn.execute(
                    "INSERT OR IGNORE INTO events(event_id, run_id, cycle, noise, category,"
                    " emitted_ms, sim_elapsed_s) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (event_id, run.run_id, cycle, noise, truth, now_ms(), sim),
                )
        self.node.send(tx.published)
        log.info("emitted cycle %d (%s)", cycle, category,
                 extra={"event_id": f"{run.run_id}/c{cycle:03d}", "noise_events": len(batch) - 1})

    # -- snapshots and anomaly rules -------------------------------------------

    def _snapshots(self, run: runs.Run, sim: float) -> None:
        """Write every snapshot that is due (scheduled at idx * interval < duration)."""
        for kind in SNAPSHOT_KINDS:
            interval = run.interval_s(kind)
            due: list[int] = []
            while True:
                idx = self._next_snapshot[kind] + len(due)
                if idx * interval > sim or idx * interval >= run.duration_s:
                    break
                due.append(idx)
            if not due:
                continue
            try:
                body = self._measure(kind, run, sim)
            except (sqlite3.Error, JournalError) as exc:
                self.alert_database_error(self._database_of(exc, kind), exc,
                                          f"writing {kind} snapshot")
                continue
            for idx in due:
                at = idx * interval
                path = snapshots.snapshot_path(self.settings.log_dir, kind, at)
                snapshots.write_json(path, {**snapshots.header(run.run_id, at, sim), **body})
                with self.journal.transaction() as tx:
                    tx.conn.execute(
                        "INSERT OR REPLACE INTO snapshots(run_id, kind, idx, sim_elapsed_s, path,"
                        " written_ms) VALUES (?, ?, ?, ?, ?, ?)",
                        (run.run_id, kind, idx, at, str(path), now_ms()))
            self._next_snapshot[kind] = due[-1] + 1

    def _database_of(self, exc: BaseException, kind: str) -> Path:
        named = self._database_named(str(exc))
        if named != self.settings.messages_db:
            return named
        return {"costs": self.settings.costs_db,
                "patterns": self.settings.patterns_db}.get(kind, self.settings.messages_db)

    def _measure(self, kind: str, run: runs.Run, sim: float) -> dict[str, Any]:
        if kind == "metrics":
            return self._metrics(run, sim)
        if kind == "costs":
            ledger = self._cost_ledger()
            totals = ledger.totals(run.run_id)
            return snapshots.cost_snapshot(totals, ledger.spent_since(run.run_id, sim - 3600),
                                           runs.budget_usd(run, self.settings.budget_usd))
        stats = self._pattern_stats(run, sim)
        stats["memory_growth_pct_per_hour"] = self._last_growth
        return stats

    def _pattern_stats(self, run: runs.Run, sim: float) -> dict[str, Any]:
        conn = (snapshots.open_readonly(self.settings.patterns_db)
                if self.settings.patterns_db.exists() else None)
        try:
            # WITNESS has not started yet, or has created the file but not yet its tables
            if conn is None or not conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE name='detections'").fetchone():
                events = snapshots.run_events(self.journal.conn, run.run_id)
                return {"detections": {"total": 0, "by_type": dict.fromkeys(CATEGORIES, 0),
                                       "average_confidence": None,
                                       "average_confidence_by_type": {}},
                        "learning": {"total_patterns": 0, "new_patterns_this_hour": 0,
                                     "confidence_trend": 0.0, "cross_session_matches": 0},
                        "scoring": snapshots.detection_scores(events, {})}
            return snapshots.pattern_stats(self.journal.conn, conn, run.run_id, sim,
                                           run.interval_s("patterns"))
        finally:
            if conn is not None:
                conn.close()

    def _metrics(self, run: runs.Run, sim: float) -> dict[str, Any]:
        pids = {name: h.pid for name, h in self.monitor.agents.items() if h.pid is not None}
        pids[self.name] = os.getpid()
        queues: dict[str, int] = {}
        for backlog in self.journal.backlogs():
            queues[backlog.stream] = max(queues.get(backlog.stream, 0), backlog.pending)
        warm = {self.name} | {
            name for name, h in self.monitor.agents.items()
            if _applied(h.last_payload) >= WARM_AFTER_MESSAGES}
        sample = self.sampler.sample(pids, sim, queues=queues, warm=warm, databases={
            path.name: path for path in (self.settings.patterns_db, self.settings.messages_db,
                                         self.settings.costs_db)})
        sample["sim_elapsed_s"] = round(sim, 1)
        sample["agents_alive"] = {name: h.responsive for name, h in self.monitor.agents.items()}
        self._last_growth = sample["memory_growth_pct_per_hour"]
        self._evaluate_rules(run, sim, sample)
        return sample

    def _evaluate_rules(self, run: runs.Run, sim: float, sample: dict[str, Any]) -> None:
        """The anomaly rules, on the sample just measured and on the run's records."""
        found = self.rules.backlog(sample["queues"], sim)
        found += self.rules.memory(
            {name: p["rss_mb"] for name, p in sample["processes"].items()},
            self.sampler.hourly_growth(sim), sim)
        try:
            found += self.rules.cost_spike(
                self._cost_ledger().spent_since(run.run_id, sim - 3600), sim)
        except sqlite3.Error as exc:
            self.alert_database_error(self.settings.costs_db, exc, "reading the cost ledger")
        try:
            found += self.rules.detection(self._pattern_stats(run, sim)["scoring"], sim)
        except sqlite3.Error as exc:
            self.alert_database_error(self.settings.patterns_db, exc, "reading the pattern store")
        for alert in found:
            self._raise(alert)

    def _end_run(self, status: str, state: dict[str, int]) -> None:
        assert self.active is not None
        runs.finish(self.journal.conn, self.active.run_id, status)
        log.info("run %s %s: %s", self.active.run_id, status, state)
        if status != runs.COMPLETED:
            self.raise_alert("run_incomplete", "error",
                             f"{state['emitted'] - state['completed']} events without an outcome "
                             f"after the drain timeout", **state)
        self.active = None
        self.active_clock = None

