"""WITNESS: classifies each event on telemetry_stream and learns from what it sees.

For each event it asks the detector (static embeddings + learned classifier +
nearest exemplars from the pattern store) for a pattern and a calibrated
confidence. A detection is published to improvement_queue as a signal and becomes
an exemplar in the store; an abstention is recorded as the event's outcome
("no_pattern"), so every event ends recorded exactly once either way. WITNESS runs
locally and costs nothing.

The store is a separate database, so its writes cannot share the journal
transaction; they are keyed by event id instead, and a message re-applied after a
crash reuses the detection already stored rather than classifying again. So the
classification is prepared outside the journal transaction (which then holds the
journal's write lock only for the outcome or the signal), and quick ones are
committed many to a transaction. Waiting events are classified as one batch (up to the
bus's ``PREPARE_CHUNK``): one embedding call, one index search, one matrix product and
one store transaction for all of them.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from trinity.bus.journal import Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.process import BusProcess
from trinity.clock import now_ms
from trinity.contract import (
    ALERTS,
    HEARTBEATS,
    IMPROVEMENT,
    NO_PATTERN,
    TOPOLOGY,
    WITNESS,
    no_pattern_id,
)
from trinity.errors import InvalidPayload, MalformedMessage
from trinity.memory import release_free_memory
from trinity.stores import runs

if TYPE_CHECKING:
    from trinity.agents.witness.knowledge import Knowledge, Observation, Seen

log = logging.getLogger(__name__)


SIGNAL_CONTEXT = ("file", "line", "error_type", "test_name", "files", "failure_rate", "source",
                  "labels")


def _plain(value: Any) -> bool:
    """A short scalar or list of strings: safe to pass on in a signal."""
    if isinstance(value, str):
        return 0 < len(value) <= 300
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, list) and 0 < len(value) <= 20 and all(
        isinstance(v, str) and len(v) <= 200 for v in value)


class Witness(BusProcess):
    topology = TOPOLOGY
    name: ClassVar[str] = WITNESS
    publishes: ClassVar[tuple[str, ...]] = (IMPROVEMENT, ALERTS, HEARTBEATS)
    # Store writes are idempotent by event id and happen in ``prepare``; the commits
    # only write inside the transaction, so a batch may be re-run.
    isolate_each_message: ClassVar[bool] = False
    prepares: ClassVar[bool] = True
    # Events are classified in batches: one embedding call, index search and matrix
    # product, and one store transaction, for all the events waiting.
    prepares_many: ClassVar[bool] = True
    # The embedding tables' pages that classifying touched are given back at most this
    # often (a few hundred minor page faults to read them again): resident, they grow
    # towards the whole tables (16 MB) over a day of events. The C heap's free pages go
    # back then too (a batch's tokenizer, FAISS and numpy buffers; ~5 MB after 400
    # events, and a trim takes ~1 ms).
    RELEASE_PAGES_EVERY_S: ClassVar[float] = 2.0
    # How often the store is asked for corrections recorded by ``trinity witness correct``.
    CORRECTIONS_EVERY_S: ClassVar[float] = 1.0

    def initialize(self) -> None:
        # Imported here, not at the top: the detector's scikit-learn, SciPy and FAISS
        # cost ~75 MB private (~115 MB RSS), which a process that imports this module
        # without running WITNESS (a tool, a test) should not pay.
        from trinity.agents.witness.knowledge import Knowledge

        super().initialize()
        runs.ensure_schema(self.journal.conn)
        self.knowledge: Knowledge = Knowledge.open(self.settings)
        self._classified = 0
        self._release_at = self.clock.monotonic() + self.RELEASE_PAGES_EVERY_S
        self._corrections_at = self.clock.monotonic() + self.CORRECTIONS_EVERY_S

    def tick(self) -> None:
        now = self.clock.monotonic()
        if now >= self._corrections_at:  # corrections another process recorded
            self._corrections_at = now + self.CORRECTIONS_EVERY_S
            self.knowledge.store.refresh_corrections()
        if self._classified and now >= self._release_at:
            self._classified = 0
            self._release_at = now + self.RELEASE_PAGES_EVERY_S
            self.knowledge.embedder.release_pages()
            release_free_memory()

    def shutdown(self) -> None:
        self.knowledge.close()
        super().shutdown()

    def heartbeat(self) -> dict[str, Any]:
        beat = super().heartbeat()
        replica = self.knowledge.store.replica if hasattr(self, "knowledge") else None
        problem = replica.problem() if replica is not None else None
        if problem and "database_error" not in beat:
            # Detections are safe in the local outbox meanwhile; the controller alerts.
            beat["database_error"] = {"error": problem, "error_type": "FirestoreUnavailable",
                                      "database": "firestore", "ts_ms": now_ms()}
        if hasattr(self, "knowledge"):
            # events decided from the detector's text cache (no embedding, no n-grams),
            # and texts worked out
            detector = self.knowledge.detector
            beat["text_cache"] = {"hits": detector.text_hits, "misses": detector.text_misses}
        return beat

    def prepare(self, msg: Message) -> Callable[[Transaction], None]:
        result = self.prepare_many([msg])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare_many(self, msgs: list[Message]) -> list[Callable[[Transaction], None] | Exception]:
        """Classify the events as one batch and record them in one store transaction.
        A store that is busy or unreachable makes the whole chunk wait for a retry; any
        other failure of a batch sends each event through alone, so only the one at fault
        is dead-lettered, with its own reason (as is each message that is not an event)."""
        started = time.perf_counter()
        parsed = [self._parse(msg) for msg in msgs]
        seen = [p for p in parsed if not isinstance(p, Exception)]
        try:
            observed = iter(self._observe(seen, started))
            return [p if isinstance(p, Exception) else self._commit(p, next(observed))
                    for p in parsed]
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            if len(seen) == 1:  # that event is the one at fault
                return [p if isinstance(p, Exception) else exc for p in parsed]
            if not isinstance(exc, InvalidPayload):
                log.exception("classifying a batch of %d events failed; one at a time",
                              len(seen))
        return [p if isinstance(p, Exception) else self._alone(p) for p in parsed]

    def _alone(self, seen: Seen) -> Callable[[Transaction], None] | Exception:
        try:
            return self._commit(seen, self._observe([seen], time.perf_counter())[0])
        except Exception as exc:
            return exc

    @staticmethod
    def _parse(msg: Message) -> Seen | Exception:
        try:
            event = msg.json()
        except MalformedMessage as exc:
            return InvalidPayload(exc.reason)
        if not isinstance(event, dict):
            return InvalidPayload(f"an event is a JSON object, not {type(event).__name__}")
        event_id = event.get("event_id")
        if not isinstance(event_id, str) or not event_id.strip():
            event_id = msg.msg_id
        run_id = event.get("run_id") if isinstance(event.get("run_id"), str) else None
        return event, event_id, run_id

    def _observe(self, seen: list[Seen], started: float) -> list[Observation]:
        try:
            observed = self.knowledge.observe_many(seen, started=started)
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError and not isinstance(
                    exc, sqlite3.OperationalError):
                raise
            # Name the file: the event waits for a retry and the alert says which store.
            raise type(exc)(f"{self.settings.patterns_db.name}: {exc}") from exc
        self._classified += sum(o.new for o in observed)
        return observed

    def _commit(self, seen: Seen, outcome: Observation) -> Callable[[Transaction], None]:
        event, event_id, run_id = seen
        if outcome.pattern is None:
            reason = outcome.reason

            def record_none(tx: Transaction) -> None:
                runs.record_outcome(tx.conn, task_id=no_pattern_id(event_id), event_id=event_id,
                                    run_id=run_id, delegate=WITNESS, status=NO_PATTERN,
                                    product=reason)
            return record_none
        signal: dict[str, Any] = {
            "signal_id": event_id,
            "event_id": event_id,
            "run_id": run_id,
            "cycle": event.get("cycle"),
            "pattern": outcome.pattern,
            "confidence": round(outcome.confidence, 4),
            "severity": event.get("severity") if isinstance(event.get("severity"), str) else None,
            "detector": WITNESS,
            "message": event["message"][:2000],
            # What ARCHITECT's and EXECUTOR's prompts show besides the message.
            **{k: event[k] for k in SIGNAL_CONTEXT if _plain(event.get(k))},
        }
        payload = encode_payload(signal)

        def publish(tx: Transaction) -> None:
            # Keyed by the event: re-applying after a crash cannot publish it twice.
            tx.publish(IMPROVEMENT, payload, key=event_id)
        return publish
