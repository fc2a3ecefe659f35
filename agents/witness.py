"""WITNESS: reads telemetry_stream, turns each event into a signal on improvement_queue.

The detector here is a placeholder that forwards every event unclassified; the
pattern detector replaces it.
"""

from __future__ import annotations

from typing import ClassVar

from trinity.agents.base import BaseProcess, event_fields
from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.topology import ALERTS, HEARTBEATS, IMPROVEMENT
from trinity.errors import InvalidPayload


class Witness(BaseProcess):
    name: ClassVar[str] = "witness"
    publishes: ClassVar[tuple[str, ...]] = (IMPROVEMENT, ALERTS, HEARTBEATS)
    isolate_each_message: ClassVar[bool] = False

    def handle(self, msg: Message, tx: Transaction) -> None:
        event = event_fields(msg, {"message": str})
        if not event["message"].strip():
            raise InvalidPayload("field 'message' is empty")
        event_id = event.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            event_id = msg.msg_id
        signal = {
            "signal_id": event_id,
            "event_id": event_id,
            "run_id": event.get("run_id"),
            "cycle": event.get("cycle"),
            "pattern": None,
            "confidence": 0.0,
            "detector": "placeholder",
            "message": event["message"][:2000],
        }
        # Keyed by the event: re-applying after a crash cannot publish it twice.
        tx.publish(IMPROVEMENT, encode_payload(signal), key=event_id)
