"""EXECUTOR: hands each task to its delegate sub-agent and records the outcome once.

The delegate (QualityEnforcer, AgencyCodeAgent, TestGenerator, Planner) produces its
work product with a model call: a proposed change, a refactoring plan, a test plan or
an implementation plan. The product is stored with the task's outcome; nothing edits
the user's code. The outcome row is written in the transaction that advances
EXECUTOR's cursor, so it exists exactly once whatever is killed when. Outcomes are
records, never new telemetry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from trinity.agents.delegates import delegate_named, parse_as, schema_of
from trinity.agents.model_agent import ModelAgent, event_context, event_fields
from trinity.agents.models.providers.base import ChatRequest
from trinity.bus.journal import Transaction
from trinity.bus.message import Message
from trinity.contract import ALERTS, EXECUTOR, HEARTBEATS, TASK_DONE, TASK_FAILED, request_id
from trinity.errors import AllModelsFailed, InvalidPayload
from trinity.stores import runs


class Executor(ModelAgent):
    name: ClassVar[str] = EXECUTOR
    publishes: ClassVar[tuple[str, ...]] = (ALERTS, HEARTBEATS)

    def prepare(self, msg: Message) -> Callable[[Transaction], None]:
        task = event_fields(msg, {"task_id": str, "event_id": str, "delegate": str,
                                  "pattern": str, "description": str})
        if not task["task_id"].strip():
            raise InvalidPayload("field 'task_id' is empty")
        try:
            delegate = delegate_named(task["delegate"], task["pattern"])
        except KeyError as exc:
            raise InvalidPayload(str(exc.args[0])) from None
        context = event_context(task)
        user = (f"Task: {task['description'][:400]}\n"
                f"Acceptance: {str(task.get('acceptance', ''))[:300]}\n"
                f"Problem ({task['pattern']}): {str(task.get('message', ''))[:600]}"
                + (f"\n{context}" if context else ""))
        request = ChatRequest(
            messages=({"role": "system", "content": delegate.role + " Answer in JSON."},
                      {"role": "user", "content": user}),
            schema=schema_of(delegate.product),
            max_tokens=self.policy.max_tokens_for(self.name),
        )
        ctx = self.context(request_id(EXECUTOR, task["task_id"]), task, task_id=task["task_id"])
        try:
            routed = self.router.call(request, ctx, parse_as(delegate.product))
        except AllModelsFailed as failed:
            return self._commit(task, TASK_FAILED, {"error": str(failed)[:2000]},
                                failed.attempts)
        product: dict[str, Any] = {"kind": delegate.product_kind, "delegate": delegate.name,
                                   "engine": routed.provider, "model": routed.model,
                                   **routed.value}
        return self._commit(task, TASK_DONE, product, routed.attempts)

    def _commit(self, task: dict[str, Any], status: str, product: dict[str, Any],
                attempts: list[Any]) -> Callable[[Transaction], None]:
        def commit(tx: Transaction) -> None:
            self.publish_call_alerts(tx, attempts)
            runs.record_outcome(tx.conn, task_id=task["task_id"], event_id=task["event_id"],
                                run_id=task.get("run_id"), delegate=task["delegate"],
                                status=status, product=json.dumps(product, sort_keys=True))
        return commit
