"""Alerts on the bus: journaled on the ``alerts`` stream, written to alerts.log by the
controller (``trinity.stores.run_logs.AlertLog``), each once.

An alert is journaled before anything else happens to it, so one raised while the
controller is down is written to ``alerts.log`` once the controller is back. Its shape
is the contract's :class:`~trinity.contract.Alert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.contract import ALERTS, Alert
from trinity.errors import MalformedMessage


def journal_alert(messages_db: Path, alert: Alert, *, source: str) -> None:
    """Journal ``alert`` from outside the controller (keyed by its id: once, even if
    repeated); the controller writes it to alerts.log when it applies it."""
    journal = Journal(messages_db, source=source)
    try:
        with journal.transaction() as tx:
            tx.publish(ALERTS, encode_payload(alert.payload()), key=alert.alert_id)
    finally:
        journal.close()


def alert_of(msg: Message) -> dict[str, Any]:
    """The alert an ``alerts`` message carries, as alerts.log writes it: a payload that is
    not JSON is a ``malformed_alert``, and an alert without a usable id is named by the
    message id (as "None" every such alert would be taken for the first one and skipped)."""
    try:
        alert = msg.json()
    except MalformedMessage:
        alert = {"alert_id": msg.msg_id, "kind": "malformed_alert", "severity": "warning"}
    if not isinstance(alert.get("alert_id"), str) or not alert["alert_id"].strip():
        alert["alert_id"] = msg.msg_id
    return alert
