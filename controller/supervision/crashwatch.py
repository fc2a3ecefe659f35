"""supervisord event listener: records every unexpected exit as an alert, and restarts
a hung controller.

supervisord runs this as ``[eventlistener:crashwatch]`` subscribed to
PROCESS_STATE_EXITED, PROCESS_STATE_FATAL and TICK_5; on each tick it looks at the
controller's alive file (``trinity.controller.supervision.watchdog``). stdout is the listener
protocol channel, so nothing else may be printed there; diagnostics go to stderr.
An exit is unexpected when supervisord says ``expected:0`` (a kill -9, a crash,
an exit code not in ``exitcodes``). The alert is journaled, so it reaches
alerts.log even when the process that exited was the controller itself; when the
journal cannot be written, it is appended to alerts.log directly.
"""

from __future__ import annotations

import logging
import sqlite3
import sys

from supervisor import childutils

from trinity.bus.journal import Journal
from trinity.bus.message import encode_payload
from trinity.contract import ALERTS, CRASHWATCH, Alert
from trinity.controller.supervision.supervisord import SupervisorClient
from trinity.controller.supervision.watchdog import ControllerWatch
from trinity.errors import JournalError
from trinity.settings import Settings
from trinity.stores.run_logs import ALERTS_LOG, AlertLog

log = logging.getLogger(__name__)


def alert_for(event_name: str, payload: dict[str, str]) -> Alert | None:
    """The alert an event deserves, or None for an expected exit."""
    process = payload.get("processname", "?")
    if event_name == "PROCESS_STATE_EXITED" and payload.get("expected") == "0":
        return Alert.of(
            "agent_crashed", "critical",
            f"{process} exited unexpectedly (pid {payload.get('pid', '?')}, "
            f"from {payload.get('from_state', '?')})",
            agent=process, pid=payload.get("pid"), from_state=payload.get("from_state"),
            group=payload.get("groupname"))
    if event_name == "PROCESS_STATE_FATAL":
        return Alert.of(
            "agent_fatal", "critical",
            f"supervisord gave up restarting {process} (too many failed starts)",
            agent=process, from_state=payload.get("from_state"),
            group=payload.get("groupname"))
    return None


def record(settings: Settings, journal: Journal | None, alert: Alert) -> Journal | None:
    """Journal ``alert`` (opening the journal if it is not open yet); returns the journal.

    A journal that cannot be opened or written (corrupt, locked, on a full disk) must not
    lose the alert: it is then appended to alerts.log directly, as the controller does
    with its own alerts in that case.
    """
    try:
        if journal is None:
            journal = Journal(settings.messages_db, source=CRASHWATCH)
        with journal.transaction() as tx:
            tx.publish(ALERTS, encode_payload(alert.payload()), key=alert.alert_id)
    except (JournalError, sqlite3.Error) as exc:
        log.error("cannot journal alert %s (%s); writing it to alerts.log directly",
                  alert.alert_id, exc)
        AlertLog(settings.log_dir / ALERTS_LOG).write_alert(alert.payload(), source=CRASHWATCH)
    return journal


def main(settings: Settings) -> int:
    journal: Journal | None = None
    control = SupervisorClient.from_env()
    watch = ControllerWatch(settings, control) if control is not None else None
    while True:
        headers, body = childutils.listener.wait(sys.stdin, sys.stdout)
        event_name = headers.get("eventname", "")
        try:
            if event_name.startswith("TICK_"):
                alert = watch.check() if watch is not None else None
            else:
                event_payload, _ = childutils.eventdata(body + "\n")
                alert = alert_for(event_name, event_payload)
            if alert is not None:
                journal = record(settings, journal, alert)
                log.warning("recorded %s", alert.message)
        except Exception:  # the listener must answer supervisord whatever happens
            log.exception("crashwatch could not handle %s: %r", event_name, body[:500])
        childutils.listener.ok(sys.stdout)
