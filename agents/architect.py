"""ARCHITECT: turns each signal on improvement_queue into tasks on execution_queue.

The planner here is a placeholder (one task per signal); model-backed planning
replaces it.
"""

from __future__ import annotations

from typing import ClassVar

from trinity.agents.base import BaseProcess, event_fields
from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.topology import ALERTS, EXECUTION, HEARTBEATS
from trinity.errors import InvalidPayload


class Architect(BaseProcess):
    name: ClassVar[str] = "architect"
    publishes: ClassVar[tuple[str, ...]] = (EXECUTION, ALERTS, HEARTBEATS)

    def handle(self, msg: Message, tx: Transaction) -> None:
        signal = event_fields(msg, {"event_id": str})
        if not signal["event_id"].strip():
            raise InvalidPayload("field 'event_id' is empty")
        task_id = f"{signal['event_id']}/t1"
        task = {
            "task_id": task_id,
            "event_id": signal["event_id"],
            "run_id": signal.get("run_id"),
            "delegate": "placeholder",
            "pattern": signal.get("pattern"),
        }
        tx.publish(EXECUTION, encode_payload(task), key=task_id)
