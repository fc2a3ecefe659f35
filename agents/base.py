"""The base of every Trinity process: initialize / loop / shutdown, a clock injected.

``run()`` installs SIGTERM/SIGINT handlers that only set a flag; the loop polls
its socket with a short timeout, so a stop request is honoured within one poll
interval and the process exits 0 after closing its sockets and database.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar, TypeVar

from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message
from trinity.bus.node import BusNode
from trinity.bus.topology import DEFAULT_TOPOLOGY, HEARTBEATS, Topology
from trinity.clock import Clock, ScaledClock, now_ms
from trinity.errors import InvalidPayload, JournalError, MalformedMessage, ModelTimeout
from trinity.memory import release_free_memory
from trinity.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
# How long past its own timeout a call may take before the wait gives up on it.
_CALL_GRACE_S = 5.0
# After a database error: pause this long (still beating) before the next loop turn.
DB_ERROR_BACKOFF_S = 1.0


class BaseProcess:
    name: ClassVar[str] = "process"
    publishes: ClassVar[tuple[str, ...]] = ()
    sends_heartbeats: ClassVar[bool] = True
    # False where handlers only write inside the journal transaction (or are
    # idempotent outside it): a batch then runs without a savepoint per message.
    isolate_each_message: ClassVar[bool] = True
    # True where a message needs slow work (a model call): ``prepare`` then runs it
    # outside the journal transaction, one message at a time, heartbeats continuing.
    prepares: ClassVar[bool] = False

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        topology: Topology = DEFAULT_TOPOLOGY,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or ScaledClock(settings.time_scale)
        self.topology = topology
        self.stopping = False
        self._next_heartbeat = 0.0
        self.database_error: dict[str, Any] | None = None
        self.journal: Journal
        self.node: BusNode

    # -- lifecycle --------------------------------------------------------

    def initialize(self) -> None:
        self.journal = Journal(self.settings.messages_db, source=self.name)
        self.node = BusNode(
            self.name, self.settings, self.journal, self.topology, publishes=self.publishes,
            isolate_each=self.isolate_each_message,
        )

    def loop(self) -> None:
        """One turn: receive, apply, beat, then the subclass's periodic work."""
        self.node.receive(timeout_ms=int(self.settings.poll_interval_s * 500))
        self.node.drain(self.handle, prepare=self.prepare if self.prepares else None)
        failure = self.node.take_storage_error()
        if failure is not None:  # the message waits for a retry; say why
            raise failure
        inbox, self.node.ephemeral_inbox = self.node.ephemeral_inbox, []
        for msg in inbox:
            self.handle_ephemeral(msg)
        self.beat()
        self.tick()

    def beat(self) -> None:
        """Send a heartbeat if one is due."""
        now = self.clock.monotonic()
        if self.sends_heartbeats and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval_s
            self.node.send_ephemeral(HEARTBEATS, self.heartbeat())

    def wait_for(
        self, fn: Callable[[], T], timeout_s: float, cancel: threading.Event
    ) -> T:
        """Run ``fn`` in a worker thread and keep beating while it runs.

        ``fn`` is expected to honour its own timeout; past ``timeout_s`` plus a grace
        the cancel flag is set and the wait gives up with ModelTimeout (the thread is
        left to finish on its own). A stop request also cancels the call.
        """
        done = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name=f"{self.name}-call", daemon=True).start()
        give_up = time.monotonic() + timeout_s + _CALL_GRACE_S
        while not done.wait(min(self.settings.heartbeat_interval_s / 2, 0.25)):
            self.beat()
            if self.stopping:
                cancel.set()
            if time.monotonic() > give_up:
                cancel.set()
                raise ModelTimeout(f"{self.name}: call still running after {timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        self.node.close()
        self.journal.close()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.initialize()
        # Start-up (imports, loading a model or an index) leaves freed heap behind.
        release_free_memory()
        log.info("%s started", self.name, extra={"pid": os.getpid()})
        try:
            while not self.stopping:
                try:
                    self.loop()
                    self.database_error = None
                except (JournalError, sqlite3.Error) as exc:
                    self._database_failed(exc)
        finally:
            self.shutdown()
        log.info("%s stopped cleanly", self.name)
        return 0

    def _database_failed(self, exc: BaseException) -> None:
        """A locked, full or corrupt database must not end the process: what failed was
        rolled back, so report it, wait a little and go on (it is retried)."""
        log.error("database error: %s", exc, exc_info=exc)
        self.database_error = {"error": str(exc)[:500], "error_type": type(exc).__name__,
                               "ts_ms": now_ms()}
        self._next_heartbeat = 0.0  # the next heartbeat carries the error now
        try:
            self.on_database_error(exc)
        except (JournalError, sqlite3.Error) as again:
            log.error("could not report the database error: %s", again)
        deadline = time.monotonic() + DB_ERROR_BACKOFF_S
        while time.monotonic() < deadline and not self.stopping:
            try:
                self.beat()
            except (JournalError, sqlite3.Error) as again:
                log.error("cannot send a heartbeat: %s", again)
            time.sleep(0.1)

    def on_database_error(self, exc: BaseException) -> None:
        """Hook: the controller raises an alert; agents report it in their heartbeat."""

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    # -- what subclasses fill in ----------------------------------------

    def handle(self, msg: Message, tx: Transaction) -> None:
        """Apply one journaled message inside ``tx``; raise InvalidPayload to dead-letter it."""
        raise NotImplementedError

    def prepare(self, msg: Message) -> Callable[[Transaction], None]:
        """With ``prepares``: the slow part, outside any transaction; returns the commit.

        Raise InvalidPayload to dead-letter the message, RetryableError to try later.
        """
        raise NotImplementedError

    def handle_ephemeral(self, msg: Message) -> None:
        """A heartbeat or other unjournaled message addressed to this process."""

    def tick(self) -> None:
        """Periodic work after each loop turn."""

    def heartbeat(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "pid": os.getpid(),
            "ts_ms": now_ms(),
            "counters": self.node.counters.as_dict(),
            "heads": self.node.heads(),
            "cursors": self.node.cursors(),
            **({"database_error": self.database_error} if self.database_error else {}),
        }


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

