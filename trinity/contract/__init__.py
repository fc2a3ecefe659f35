"""The vocabulary every part of Trinity shares: processes, streams, labels, outcomes, alerts.

A name spelled here is spelled nowhere else: the processes supervisord runs, the streams
of the bus and who consumes each (:data:`TOPOLOGY`), the five patterns WITNESS detects
and the label of "none of them", the outcomes an event can end in, and the one shape of
an alert (:class:`Alert`). The event itself, its fields and limits, is
:mod:`trinity.contract.event` (a pydantic model, imported only where events are read).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trinity.clock import now_ms
from trinity.endpoints import check_endpoint
from trinity.errors import ConfigError

# -- processes ------------------------------------------------------------------------

CONTROLLER = "controller"
WITNESS = "witness"
ARCHITECT = "architect"
EXECUTOR = "executor"
AGENTS = (WITNESS, ARCHITECT, EXECUTOR)
# The programs of supervisor.conf, in the order they are started.
PROCESSES = (CONTROLLER, *AGENTS)
# supervisord's event listener that records exits (``[eventlistener:crashwatch]``).
CRASHWATCH = "crashwatch"
# The shared model server (``[program:models]``, ``trinity model-server``): the embedded
# model for ARCHITECT and EXECUTOR, off the bus.
MODELS = "models"
MODEL_SERVER_COMMAND = "model-server"  # `trinity model-server`
# Every program supervisord runs for Trinity but its event listener: the processes on the
# bus and the model server.
PROGRAMS = (*PROCESSES, MODELS)

# -- streams ----------------------------------------------------------------------------

TELEMETRY = "telemetry_stream"
IMPROVEMENT = "improvement_queue"
EXECUTION = "execution_queue"
ALERTS = "alerts"
HEARTBEATS = "heartbeats"
# The pipeline's queues, in the order an event passes them.
QUEUES = (TELEMETRY, IMPROVEMENT, EXECUTION)


@dataclass(frozen=True)
class Topology:
    """Who consumes which stream, and where each process listens.

    Every process that consumes something binds one inbound socket; publishers connect
    to the inbound sockets of the consumers of the streams they publish. ``ephemeral``
    streams (heartbeats) are sent but never journaled. A process listens on
    ``ipc://<run_dir>/<name>.sock`` unless ``endpoints`` names another endpoint.
    """

    consumers: Mapping[str, tuple[str, ...]]
    ephemeral: frozenset[str] = frozenset()
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The ephemeral stream processes send their heartbeats on (None: they send none).
    heartbeats: str | None = None

    def __post_init__(self) -> None:
        for name, endpoint in self.endpoints.items():
            if not self.listens(name):
                raise ConfigError(f"endpoint for {name!r}: not a process of the topology "
                                  f"({', '.join(self.process_names)})")
            check_endpoint(endpoint)

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.consumers)

    def durable_streams(self) -> tuple[str, ...]:
        return tuple(s for s in self.consumers if s not in self.ephemeral)

    def consumed_by(self, name: str) -> tuple[str, ...]:
        """Durable streams ``name`` applies from the journal."""
        return tuple(s for s in self.durable_streams() if name in self.consumers[s])

    @property
    def process_names(self) -> tuple[str, ...]:
        """Every process that binds an inbound socket."""
        return tuple(sorted({c for consumers in self.consumers.values() for c in consumers}))

    def listens(self, name: str) -> bool:
        return any(name in consumers for consumers in self.consumers.values())

    def peers_for(self, publishes: Iterable[str], exclude: str | None = None) -> tuple[str, ...]:
        names = {c for s in publishes for c in self.consumers.get(s, ())}
        names.discard(exclude or "")
        return tuple(sorted(names))

    def endpoint(self, name: str, run_dir: Path) -> str:
        return self.endpoints.get(name) or f"ipc://{run_dir}/{name}.sock"

    def with_endpoints(self, endpoints: Mapping[str, str]) -> Topology:
        """This topology with ``endpoints`` in place of the ipc sockets (or earlier ones)."""
        if not endpoints:
            return self
        merged = {**self.endpoints, **endpoints}
        return replace(self, endpoints=MappingProxyType(merged))


TOPOLOGY = Topology(
    consumers=MappingProxyType({
        TELEMETRY: (WITNESS,),
        IMPROVEMENT: (ARCHITECT,),
        EXECUTION: (EXECUTOR,),
        ALERTS: (CONTROLLER,),
        HEARTBEATS: (CONTROLLER,),
    }),
    ephemeral=frozenset({HEARTBEATS}),
    heartbeats=HEARTBEATS,
)

# -- labels -----------------------------------------------------------------------------

CRITICAL_ERROR = "critical_error"
CONSTITUTION_VIOLATION = "constitution_violation"
FEATURE_REQUEST = "feature_request"
DUPLICATION = "duplication"
FLAKY_TEST = "flaky_test"
# The patterns WITNESS detects, in the order the plan's scenario rotates through them.
PATTERNS = (CRITICAL_ERROR, CONSTITUTION_VIOLATION, FEATURE_REQUEST, DUPLICATION, FLAKY_TEST)
# None of the five: WITNESS abstains, the scenario's noise events are this.
NONE = "none"
LABELS = (*PATTERNS, NONE)

# -- outcomes ---------------------------------------------------------------------------

# What an event ends in, recorded in the run store's outcomes: WITNESS's abstention,
# ARCHITECT's failed plan, or one EXECUTOR outcome per task (done or failed).
NO_PATTERN = "no_pattern"
PLAN_FAILED = "plan_failed"
TASK_DONE = "done"
TASK_FAILED = "failed"
# The outcomes of work that was not done: a plan ARCHITECT could not make, a task
# EXECUTOR could not do.
FAILED_STATUSES = (PLAN_FAILED, TASK_FAILED)


def no_pattern_id(event_id: str) -> str:
    """The outcome id of WITNESS's abstention on ``event_id``."""
    return f"{event_id}/{NO_PATTERN}"


def failed_plan_id(event_id: str) -> str:
    """The outcome id of ARCHITECT's failed plan for ``event_id``."""
    return f"{event_id}/plan"


def task_id(event_id: str, number: int) -> str:
    """The id of the plan's ``number``-th task (1-based) for ``event_id``."""
    return f"{event_id}/t{number}"


def request_id(agent: str, subject_id: str) -> str:
    """The cost ledger's request id of ``agent``'s model call about an event or task."""
    return f"{agent}:{subject_id}"


# -- alerts -----------------------------------------------------------------------------

SEVERITIES = ("info", "warning", "error", "critical")


@dataclass(frozen=True)
class Alert:
    """One alert, whoever raises it: journaled on :data:`ALERTS` as :meth:`payload`,
    written once to ``alerts.log`` by the controller, POSTed to the webhook.

    ``alert_id`` is the idempotency key: an alert raised again with the same id (after a
    restart, by a condition that lasts) is written once."""

    kind: str
    severity: str
    message: str
    alert_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    agent: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    ts_ms: int = field(default_factory=now_ms)
    run_id: str | None = None
    sim_elapsed_s: float | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    @classmethod
    def of(cls, kind: str, severity: str, message: str, *, agent: str | None = None,
           alert_id: str | None = None, **details: Any) -> Alert:
        """An alert with its details given as keywords (and a fresh id unless given)."""
        return cls(kind, severity, message, alert_id=alert_id or uuid.uuid4().hex,
                   agent=agent, details=details)

    def in_run(self, run_id: str | None, sim_elapsed_s: float | None) -> Alert:
        """This alert tagged with the run (and its simulated time) it was raised in."""
        return replace(self, run_id=run_id, sim_elapsed_s=sim_elapsed_s)

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "alert_id": self.alert_id,
            "ts": datetime.fromtimestamp(self.ts_ms / 1000, UTC).isoformat(
                timespec="milliseconds"),
            "ts_ms": self.ts_ms,
            "kind": self.kind,
            "severity": self.severity,
            "agent": self.agent,
            "message": self.message,
            "details": dict(self.details),
        }
        if self.run_id is not None or self.sim_elapsed_s is not None:
            body["run_id"] = self.run_id
            body["sim_elapsed_s"] = self.sim_elapsed_s
        return body
