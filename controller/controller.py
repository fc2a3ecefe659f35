"""The controller process.

Each loop turn it: writes journaled alerts to ``alerts.log``; records agent
heartbeats and raises "agent silent" after ``heartbeat_max_missed`` missed beats
(and "agent recovered" when they resume); emits the active run's due events on
``telemetry_stream`` on the run's compressible clock; checkpoints simulated time;
raises the budget alerts from the cost ledger's totals (50/75/90 % and exceeded,
each once per run); ends the run once its duration has passed and every event has
its outcome (or once outcomes stop arriving for ``DRAIN_STALL_S``); and prunes the
journal.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

from trinity import records
from trinity.agents.base import BaseProcess
from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.topology import ALERTS, TELEMETRY
from trinity.clock import ScaledClock, now_ms
from trinity.controller import runs
from trinity.controller.alerts import AlertLog, make_alert
from trinity.controller.heartbeats import HeartbeatMonitor
from trinity.controller.scenario import event_for_cycle
from trinity.costs import CostLedger, crossed_thresholds
from trinity.errors import MalformedMessage

log = logging.getLogger(__name__)

AGENTS = ("witness", "architect", "executor")
CHECKPOINT_EVERY_S = 0.5
PRUNE_EVERY_S = 30.0
# After the last event, the run ends "timed out" only if no outcome arrives for this
# long: model calls can leave a long but moving backlog.
DRAIN_STALL_S = 300.0
BUDGET_CHECK_EVERY_S = 1.0


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
        self.journal.conn.execute(
            "CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, pid INTEGER,"
            " last_heartbeat_ms INTEGER NOT NULL, heartbeat TEXT NOT NULL)"
        )
        self.active: runs.Run | None = None
        self.active_clock: ScaledClock | None = None
        self._next_checkpoint = 0.0
        self._next_prune = self.clock.monotonic() + PRUNE_EVERY_S
        self._drain_progress: tuple[int, float] | None = None
        self.ledger = CostLedger(self.settings.costs_db)
        self._next_budget_check = 0.0
        self._load_run()

    def _load_run(self) -> None:
        records.ensure_schema(self.journal.conn)
        run = runs.active_run(self.journal.conn)
        if run is None:
            log.info("no active run: monitoring only")
            return
        self.active = run
        # Continue simulated time from the last checkpoint: downtime is not run time.
        self.active_clock = ScaledClock(run.time_scale, sim_offset_s=run.sim_elapsed_s)
        log.info("continuing run %s at simulated %.0f s", run.run_id, run.sim_elapsed_s)

    def shutdown(self) -> None:
        self.ledger.close()
        super().shutdown()

    # -- messages ---------------------------------------------------------

    def handle(self, msg: Message, tx: Transaction) -> None:
        if msg.stream == ALERTS and self.alert_log.write(msg):
            log.warning("alert: %s", msg.payload.decode("utf-8", "replace")[:500])

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
        if self.monitor.beat(agent, beat, self.clock.monotonic()):
            self.raise_alert("agent_recovered", "info", f"{agent} is sending heartbeats again",
                             agent=agent)
        with self.journal.transaction() as tx:
            tx.conn.execute(
                "INSERT INTO agents(name, pid, last_heartbeat_ms, heartbeat) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET pid=excluded.pid,"
                " last_heartbeat_ms=excluded.last_heartbeat_ms, heartbeat=excluded.heartbeat",
                (agent, beat.get("pid") if isinstance(beat.get("pid"), int) else None, now_ms(),
                 json.dumps(beat)),
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
        self.node.publish(ALERTS, alert, key=alert["alert_id"])

    # -- periodic work ------------------------------------------------------

    def tick(self) -> None:
        now = self.clock.monotonic()
        for agent, quiet in self.monitor.newly_silent(now):
            self.raise_alert(
                "agent_silent", "error",
                f"{agent} sent no heartbeat for {quiet:.1f} s "
                f"({self.settings.heartbeat_max_missed} missed)",
                agent=agent, silent_s=round(quiet, 3),
            )
        if self.active is not None and now >= self._next_budget_check:
            self._next_budget_check = now + BUDGET_CHECK_EVERY_S
            self._check_budget(self.active)
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
        if sim < run.duration_s or state["emitted"] < run.total_cycles:
            return
        if self._drain_progress is None or self._drain_progress[0] != state["completed"]:
            self._drain_progress = (state["completed"], now)
        if state["completed"] >= state["emitted"]:
            self._end_run(runs.COMPLETED, state)
        elif now - self._drain_progress[1] > DRAIN_STALL_S:
            self._end_run(runs.TIMED_OUT, state)

    def _check_budget(self, run: runs.Run) -> None:
        """Budget alerts from the ledger's total for the run; keyed, so each fires once
        per run even across controller restarts."""
        budget = runs.budget_usd(run, self.settings.budget_usd)
        spent = self.ledger.spent_usd(run.run_id)
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
        category, fields = event_for_cycle(cycle)
        event_id = f"{run.run_id}/c{cycle:03d}"
        event = {"event_id": event_id, "run_id": run.run_id, "cycle": cycle, **fields}
        with self.journal.transaction() as tx:
            tx.publish(TELEMETRY, encode_payload(event), key=event_id)
            tx.conn.execute(
                "INSERT OR IGNORE INTO events(event_id, run_id, cycle, category, emitted_ms,"
                " sim_elapsed_s) VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, run.run_id, cycle, category, now_ms(), sim),
            )
        self.node.send(tx.published)
        log.info("emitted cycle %d (%s)", cycle, category, extra={"event_id": event_id})

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
