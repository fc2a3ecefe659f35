"""EXECUTOR: performs each task on execution_queue and records its outcome once.

The outcome row is written in the transaction that advances EXECUTOR's cursor,
so it exists exactly once whatever is killed when. Outcomes are records, never
new telemetry. The delegate here is a placeholder; the sub-agents replace it.
"""

from __future__ import annotations

from typing import ClassVar

from trinity import records
from trinity.agents.base import BaseProcess, event_fields
from trinity.bus.journal import Transaction
from trinity.bus.message import Message
from trinity.bus.topology import ALERTS, HEARTBEATS
from trinity.clock import now_ms


class Executor(BaseProcess):
    name: ClassVar[str] = "executor"
    publishes: ClassVar[tuple[str, ...]] = (ALERTS, HEARTBEATS)

    def initialize(self) -> None:
        super().initialize()
        records.ensure_schema(self.journal.conn)

    def handle(self, msg: Message, tx: Transaction) -> None:
        task = event_fields(msg, {"task_id": str, "event_id": str, "delegate": str})
        tx.conn.execute(
            "INSERT INTO outcomes(task_id, event_id, run_id, delegate, status, recorded_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (task["task_id"], task["event_id"], task.get("run_id"), task["delegate"], "done",
             now_ms()),
        )
