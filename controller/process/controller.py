"""The controller process.

Each loop turn it: writes journaled alerts to ``alerts.log`` (and posts each to the
optional webhook); records agent heartbeats and raises "agent silent" after
``heartbeat_max_missed`` missed beats (and "agent recovered" when they resume),
restarting an agent that is hung rather than dead through supervisord within a restart
intensity (``healing.py``); drives the active run, if there is one (``run_driver.py``:
its events on its compressible clock, checkpoints, snapshots, anomaly rules, budget
alerts and its end); and prunes the journal. A database it cannot read or write is a
``database_error`` alert, never the end of the controller.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

from trinity.bus.journal import Transaction
from trinity.bus.message import Message
from trinity.bus.process import BusProcess
from trinity.contract import AGENTS, ALERTS, CONTROLLER, TELEMETRY, TOPOLOGY, Alert
from trinity.controller.process.alerts import alert_of
from trinity.controller.process.healing import Healer
from trinity.controller.process.heartbeats import HeartbeatMonitor, heartbeat_pid
from trinity.controller.process.metrics import MetricsSampler
from trinity.controller.process.prometheus import start_exporter
from trinity.controller.process.run_driver import RunDriver
from trinity.controller.supervision.watchdog import AliveFile, alive_path
from trinity.errors import JournalError, MalformedMessage
from trinity.process import store_advice, store_named, store_opened_by
from trinity.stores import runs
from trinity.stores.costs import CostLedger
from trinity.stores.run_logs import ALERTS_LOG, AlertLog

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 30.0
# One database_error alert per database per this many real seconds while it persists.
DB_ERROR_REPEAT_S = 60.0


def _wire_text(value: object, limit: int = 500) -> str:
    """A heartbeat's text for an alert: bounded, lone surrogates escaped (UTF-8 clean)."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


class Controller(BusProcess):
    topology = TOPOLOGY
    name: ClassVar[str] = CONTROLLER
    publishes: ClassVar[tuple[str, ...]] = (TELEMETRY, ALERTS)
    sends_heartbeats: ClassVar[bool] = False
    isolate_each_message: ClassVar[bool] = False

    def initialize(self) -> None:
        super().initialize()
        runs.ensure_schema(self.journal.conn)
        self.alert_log = AlertLog(self.settings.log_dir / ALERTS_LOG)
        self.monitor = HeartbeatMonitor(
            AGENTS, self.settings.heartbeat_deadline_s, self.clock.monotonic(),
            startup_grace_s=self.settings.startup_grace_s,
        )
        self.healer = Healer.from_settings(self.settings)
        self._next_prune = self.clock.monotonic() + PRUNE_EVERY_S
        self.ledger: CostLedger | None = None  # opened on first use (see cost_ledger)
        self.sampler = MetricsSampler()
        self.notifier: Any = None
        if self.settings.alert_webhook:
            from trinity.controller.process.webhook import WebhookNotifier

            self.notifier = WebhookNotifier(self.settings.alert_webhook)
        self._db_error_at: dict[str, float] = {}
        self._last_tick = self.clock.monotonic()
        self.alive = AliveFile(alive_path(self.settings))
        self.driver: RunDriver | None = None
        run = runs.active_run(self.journal.conn)
        if run is None:
            log.info("no active run: monitoring only")
        else:
            self.driver = RunDriver(run, self, self.sampler, self.clock.monotonic)
            log.info("continuing run %s at simulated %.0f s", run.run_id, run.sim_elapsed_s)
        try:
            self.cost_ledger()
        except sqlite3.Error as exc:
            self.alert_database_error(self.settings.costs_db, exc, "opening the cost ledger")
        # Prometheus /metrics on loopback (None: TRINITY_METRICS_PORT=0, or port in use).
        self.exporter = start_exporter(self.settings, {self.name: os.getpid()})

    def shutdown(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
        if self.ledger is not None:
            self.ledger.close()
        if self.notifier is not None:
            self.notifier.close()
        super().shutdown()

    def send(self, messages: list[Message]) -> None:
        """Send what a committed transaction published (the run driver's events)."""
        self.node.send(messages)

    def cost_ledger(self) -> CostLedger:
        """The cost ledger, opened on first use and again after a failed open (a corrupt
        or locked file): the controller runs on without it meanwhile, alerting."""
        if self.ledger is None:
            self.ledger = CostLedger(self.settings.costs_db)
        return self.ledger

    # -- messages ---------------------------------------------------------

    def handle(self, msg: Message, tx: Transaction) -> None:
        if msg.stream == ALERTS:
            alert = alert_of(msg)
            if self.alert_log.write_alert(alert, source=msg.source):
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
            self.raise_alert(Alert("agent_recovered", "info",
                                   f"{agent} is sending heartbeats again", agent=agent))
        with self.journal.transaction() as tx:
            runs.record_heartbeat(tx.conn, agent, heartbeat_pid(beat), json.dumps(beat))

    def _dead_letter(self, msg: Message, reason: str) -> None:
        with self.journal.transaction() as tx:
            tx.dead_letter(self.name, reason, msg.payload, stream=msg.stream, msg_id=msg.msg_id)
        self.node.counters.dead_lettered += 1

    def raise_alert(self, alert: Alert) -> None:
        """Journal ``alert`` (tagged with the active run, if any) for alerts.log."""
        if self.driver is not None:
            alert = self.driver.tag(alert)
        payload = alert.payload()
        try:
            self.node.publish(ALERTS, payload, key=alert.alert_id)
        except JournalError as exc:
            # The journal itself is failing: write the alert directly, so it is not lost;
            # alerts.log keeps each alert id once should the journal deliver it later.
            log.error("cannot journal alert %s: %s", alert.alert_id, exc)
            if self.alert_log.write_alert(payload, source=self.name):
                self._announce(payload)
            self._free_journal_lock(exc)

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
        self.raise_alert(Alert(
            "database_error", "error",
            f"{database.name}: {exc} (while {doing})" + (f": {advice}" if advice else ""),
            agent=agent or self.name,
            details={"database": database.name, "error": str(exc)[:500],
                     "error_type": type(exc).__name__, **({"advice": advice} if advice else {})}))

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
                self.raise_alert(alert)

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
            self.raise_alert(Alert(
                "agent_silent", "error",
                f"{agent} sent no heartbeat for {quiet:.1f} s "
                f"({self.settings.heartbeat_max_missed} missed)",
                agent=agent, details={"silent_s": round(quiet, 3)}))
        for alert in healed:
            self.raise_alert(alert)
        if self.driver is not None:
            self.driver.drive(now)
            if self.driver.ended:
                self.driver = None
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            self.journal.prune()
