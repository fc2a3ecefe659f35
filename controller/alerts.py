"""Alerts: built here, journaled on the ``alerts`` stream, written to alerts.log by the controller.

An alert is journaled before anything else happens to it, so one raised while the
controller is down is written to ``alerts.log`` once the controller is back.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.bus.topology import ALERTS
from trinity.clock import now_ms
from trinity.errors import MalformedMessage

SEVERITIES = ("info", "warning", "error", "critical")


def make_alert(
    kind: str,
    severity: str,
    message: str,
    *,
    agent: str | None = None,
    alert_id: str | None = None,
    **details: Any,
) -> dict[str, Any]:
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")
    ts = now_ms()
    return {
        "alert_id": alert_id or uuid.uuid4().hex,
        "ts": datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds"),
        "ts_ms": ts,
        "kind": kind,
        "severity": severity,
        "agent": agent,
        "message": message,
        "details": details,
    }


def journal_alert(messages_db: Path, alert: dict[str, Any], *, source: str) -> None:
    """Journal ``alert`` from outside the controller (keyed by its id: once, even if
    repeated); the controller writes it to alerts.log when it applies it."""
    journal = Journal(messages_db, source=source)
    try:
        with journal.transaction() as tx:
            tx.publish(ALERTS, encode_payload(alert), key=alert["alert_id"])
    finally:
        journal.close()


class AlertLog:
    """``alerts.log``: one JSON object per line, each alert once even across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    self._written.add(str(json.loads(line)["alert_id"]))
                except (ValueError, KeyError, TypeError):
                    continue

    def write(self, msg: Message) -> dict[str, Any] | None:
        """Append the alert carried by ``msg``; None if it was already written."""
        try:
            alert = msg.json()
        except MalformedMessage:
            alert = {"alert_id": msg.msg_id, "kind": "malformed_alert", "severity": "warning"}
        if not isinstance(alert.get("alert_id"), str) or not alert["alert_id"].strip():
            # Missing, null, blank or not text: the message id names it (as "None" every
            # such alert would be taken for the first one and skipped).
            alert["alert_id"] = msg.msg_id
        return alert if self.write_alert(alert, source=msg.source) else None

    def write_alert(self, alert: dict[str, Any], *, source: str) -> bool:
        """Append ``alert`` unless its id was written before; True if it was appended."""
        alert_id = str(alert.get("alert_id"))
        if alert_id in self._written:
            return False
        alert["alert_id"] = alert_id
        alert["source"] = source
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(alert, default=str) + "\n")
        self._written.add(alert_id)
        return True


def read_alerts(path: Path) -> list[dict[str, Any]]:
    """Every well-formed alert in an alerts.log (a torn last line is skipped)."""
    if not path.exists():
        return []
    alerts = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            alerts.append(value)
    return alerts
