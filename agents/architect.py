"""ARCHITECT: turns each signal on improvement_queue into a plan and its tasks.

The plan comes from a model call (engine chosen by the router): a summary, steps,
and tasks, each with a description and an acceptance check. Every task goes to the
delegate its pattern calls for, with an id derived from the event id
(``<event_id>/t<n>``), and is published to execution_queue keyed by that id. If no
provider can answer, the event's outcome is recorded as ``plan_failed``: an event is
never left without an outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from trinity.agents.delegates import Plan, delegate_for, parse_as, schema_of
from trinity.agents.model_agent import ModelAgent, event_context, event_fields
from trinity.agents.models.providers.base import ChatRequest
from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.contract import (
    ALERTS,
    ARCHITECT,
    EXECUTION,
    HEARTBEATS,
    PLAN_FAILED,
    failed_plan_id,
    request_id,
    task_id,
)
from trinity.errors import AllModelsFailed, InvalidPayload
from trinity.stores import runs

SYSTEM = (
    "You are ARCHITECT, the planner of an autonomous code-improvement loop. Read the "
    "detected problem and answer with a JSON plan: a one-sentence summary, up to three "
    "short concrete steps, and the one task for {delegate}, with a description and an "
    "acceptance check that proves it is done."
)


class Architect(ModelAgent):
    name: ClassVar[str] = ARCHITECT
    publishes: ClassVar[tuple[str, ...]] = (EXECUTION, ALERTS, HEARTBEATS)

    def request_for(self, signal: dict[str, Any]) -> ChatRequest:
        delegate = delegate_for(signal.get("pattern"))
        context = event_context(signal)
        user = (f"Pattern: {signal['pattern']} (confidence {signal.get('confidence')})\n"
                f"Event: {signal['message'][:600]}" + (f"\n{context}" if context else ""))
        return ChatRequest(
            messages=({"role": "system", "content": SYSTEM.format(delegate=delegate.name)},
                      {"role": "user", "content": user}),
            schema=schema_of(Plan),
            max_tokens=self.policy.max_tokens_for(self.name),
        )

    def prepare(self, msg: Message) -> Callable[[Transaction], None]:
        signal = event_fields(msg, {"event_id": str, "pattern": str, "message": str})
        if not signal["event_id"].strip():
            raise InvalidPayload("field 'event_id' is empty")
        try:
            delegate = delegate_for(signal["pattern"])
        except KeyError as exc:
            raise InvalidPayload(str(exc.args[0])) from None
        ctx = self.context(request_id(ARCHITECT, signal["event_id"]), signal)
        try:
            routed = self.router.call(self.request_for(signal), ctx, parse_as(Plan))
        except AllModelsFailed as failed:
            return self._plan_failed(signal, failed)
        plan: dict[str, Any] = routed.value
        tasks: list[dict[str, Any]] = []
        for n, task in enumerate(plan["tasks"], start=1):
            tasks.append({
                "task_id": task_id(signal["event_id"], n),
                "event_id": signal["event_id"],
                "run_id": signal.get("run_id"),
                "pattern": signal["pattern"],
                "severity": signal.get("severity"),
                "delegate": delegate.name,
                "product_kind": delegate.product_kind,
                "description": task["description"],
                "acceptance": task["acceptance"],
                "plan": {"summary": plan["summary"], "steps": plan["steps"],
                         "engine": routed.provider, "model": routed.model},
                "message": signal["message"][:2000],
                **{k: signal[k] for k in ("file", "line", "files", "test_name", "error_type")
                   if k in signal},
            })

        def commit(tx: Transaction) -> None:
            self.publish_call_alerts(tx, routed.attempts)
            for task in tasks:
                # Keyed by the task id: re-applying after a crash cannot publish it twice.
                tx.publish(EXECUTION, encode_payload(task), key=task["task_id"])
        return commit

    def _plan_failed(
        self, signal: dict[str, Any], failed: AllModelsFailed
    ) -> Callable[[Transaction], None]:
        def commit(tx: Transaction) -> None:
            self.publish_call_alerts(tx, failed.attempts)
            runs.record_outcome(tx.conn, task_id=failed_plan_id(signal["event_id"]),
                                event_id=signal["event_id"], run_id=signal.get("run_id"),
                                delegate=ARCHITECT, status=PLAN_FAILED,
                                product=str(failed)[:2000])
        return commit
