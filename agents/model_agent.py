"""The base of the agents that call models (ARCHITECT, EXECUTOR).

Each message is prepared outside the journal transaction — the model call, through
the router, with heartbeats going on meanwhile — and committed after: its outputs,
its outcome or its alerts, in the transaction that advances the cursor. Replaying a
message after a crash asks the router again, which returns the answer the ledger
already holds for that request instead of paying for a second call.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from trinity.agents.models.policy import build_providers, load_policy
from trinity.agents.models.router import CallContext, Router
from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.process import BusProcess
from trinity.contract import ALERTS, TOPOLOGY, Alert
from trinity.errors import InvalidPayload, MalformedMessage
from trinity.memory import limit_malloc_arenas
from trinity.stores import runs
from trinity.stores.costs import TIMEOUT, CallRecord, CostLedger

# Runs whose budget a model agent keeps (cleared when full; a run is read again then).
_MAX_RUN_BUDGETS = 64
# Event fields worth showing a model, in this order.
CONTEXT_FIELDS = ("severity", "file", "line", "error_type", "test_name", "files",
                  "failure_rate", "source", "labels")


class ModelAgent(BusProcess):
    topology = TOPOLOGY
    prepares: ClassVar[bool] = True
    # A commit only writes inside the journal transaction (the call was paid and
    # recorded before it): a batch runs without a savepoint per message, and again with
    # one only if a commit raises (a message that is bad input, dead-lettered alone).
    isolate_each_message: ClassVar[bool] = False

    def initialize(self) -> None:
        self._run_budgets: dict[str, tuple[float, str]] = {}
        # Before any call thread exists: every extra malloc arena a call thread lands in
        # keeps another ~30 MB of grammar-sampling scratch (steps of +32 MB, measured).
        limit_malloc_arenas()
        super().initialize()
        runs.ensure_schema(self.journal.conn)
        self.policy = load_policy(self.settings.routing_path)
        self.ledger = CostLedger(self.settings.costs_db)
        self.router = Router(
            self.policy, build_providers(self.policy, os.environ,
                                         self.settings.model_server_endpoint),
            self.ledger,
            budget_usd=self.settings.budget_usd, budget_mode=self.settings.budget_mode,
            waiter=self.wait_for, ticker=self.tick_during_call)

    def shutdown(self) -> None:
        self.router.close()
        self.ledger.close()
        super().shutdown()

    def context(self, request_id: str, payload: dict[str, Any], *,
                task_id: str | None = None) -> CallContext:
        run_id = payload.get("run_id") if isinstance(payload.get("run_id"), str) else None
        # The budget the run was started with (`trinity run --budget`), else the settings'.
        # A run's config is written once, when it starts: read (and its JSON parsed) once
        # per run, not for every call (~15 us a call); a run not known yet is asked again.
        budget = self._run_budgets.get(run_id) if run_id is not None else None
        if budget is None:
            budget = runs.run_budget(self.journal.conn, run_id)
            if budget is not None and run_id is not None:
                if len(self._run_budgets) >= _MAX_RUN_BUDGETS:
                    self._run_budgets.clear()
                self._run_budgets[run_id] = budget
        self.router.budget_usd, self.router.budget_mode = budget or (
            self.settings.budget_usd, self.settings.budget_mode)
        pattern = payload.get("pattern")
        severity = payload.get("severity")
        return CallContext(
            agent=self.name, request_id=request_id, run_id=run_id,
            event_id=str(payload["event_id"]), task_id=task_id,
            pattern=pattern if isinstance(pattern, str) else None,
            severity=severity if isinstance(severity, str) else None,
            sim_elapsed_s=runs.sim_elapsed_s(self.journal.conn, run_id),
        )

    def publish_call_alerts(self, tx: Transaction, attempts: list[CallRecord]) -> None:
        """A ``model_timeout`` alert per timed-out attempt, keyed by its call id."""
        for call in attempts:
            if call.status != TIMEOUT:
                continue
            alert = Alert.of(
                "model_timeout", "warning",
                f"{self.name} call to {call.provider} ({call.model}) timed out after "
                f"{call.latency_ms / 1000:.1f} s",
                agent=self.name, alert_id=f"model_timeout/{call.call_id}",
                call_id=call.call_id, provider=call.provider, event_id=call.event_id,
                task_id=call.task_id, route=call.route, error=call.error,
            ).in_run(call.run_id, call.sim_elapsed_s)
            tx.publish(ALERTS, encode_payload(alert.payload()), key=alert.alert_id)


def event_context(payload: dict[str, Any]) -> str:
    """The event fields a model should see, one per line."""
    lines = []
    for name in CONTEXT_FIELDS:
        value = payload.get(name)
        if value is None or value == "" or value == []:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"{name}: {text[:200]}")
    return "\n".join(lines)


def event_fields(msg: Message, required: dict[str, type]) -> dict[str, Any]:
    """The payload as a dict, with each required field present and of its type."""
    try:
        payload = msg.json()
    except MalformedMessage as exc:
        raise InvalidPayload(exc.reason) from None
    for key, kind in required.items():
        if key not in payload:
            raise InvalidPayload(f"missing field {key!r}")
        value = payload[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidPayload(
                f"field {key!r} must be {kind.__name__}, got {type(value).__name__}"
            )
    return payload
