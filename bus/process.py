"""A process on the bus: the kernel's process lifecycle plus a journal and a BusNode.

Each loop turn receives what the socket has, applies what the journal holds after the
process's cursors (``handle`` inside the transaction, or ``prepare`` outside it and its
commit inside), reports a storage failure that made a message wait, handles the
ephemeral messages addressed to it, beats and runs the subclass's periodic ``tick``.
Which streams exist and who consumes them is the topology the process is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message
from trinity.bus.node import BusNode
from trinity.clock import Clock, now_ms
from trinity.contract import Topology
from trinity.process import BaseProcess
from trinity.settings import Settings


class BusProcess(BaseProcess):
    # The topology the process takes part in (Trinity's processes: ``contract.TOPOLOGY``).
    topology: Topology
    publishes: ClassVar[tuple[str, ...]] = ()
    # False where handlers only write inside the journal transaction (or are
    # idempotent outside it): a batch then runs without a savepoint per message.
    isolate_each_message: ClassVar[bool] = True
    # True where a message needs slow work (a model call): ``prepare`` then runs it
    # outside the journal transaction, one message at a time, heartbeats continuing.
    prepares: ClassVar[bool] = False
    # True where preparing several messages at once is cheaper per message than one at
    # a time (a classification batch): ``prepare_many`` is then called instead.
    prepares_many: ClassVar[bool] = False

    def __init__(self, settings: Settings, *, clock: Clock | None = None,
                 topology: Topology | None = None) -> None:
        super().__init__(settings, clock=clock)
        if topology is not None:
            self.topology = topology
        self.journal: Journal
        self.node: BusNode

    def initialize(self) -> None:
        self.journal = Journal(self.settings.messages_db, source=self.name)
        self.node = BusNode(
            self.name, BusConfig.of(self.settings), self.journal, self.topology,
            publishes=self.publishes, isolate_each=self.isolate_each_message,
        )

    def loop(self) -> None:
        """One turn: receive, apply, beat, then the subclass's periodic work."""
        self.node.receive(timeout_ms=int(self.settings.poll_interval_s * 500))
        self.node.drain(
            self.handle, prepare=self.prepare if self.prepares else None,
            prepare_many=self.prepare_many if self.prepares and self.prepares_many else None)
        failure = self.node.take_storage_error()
        if failure is not None:  # the message waits for a retry; say why
            raise failure
        inbox, self.node.ephemeral_inbox = self.node.ephemeral_inbox, []
        for msg in inbox:
            self.handle_ephemeral(msg)
        self.beat()
        self.tick()

    def send_heartbeat(self) -> None:
        if hasattr(self, "node") and self.topology.heartbeats is not None:
            self.node.send_ephemeral(self.topology.heartbeats, self.heartbeat())

    def release_failed_start(self) -> None:
        if hasattr(self, "node"):
            self.node.close()
            del self.node
        if hasattr(self, "journal"):
            self.journal.close()
            del self.journal

    def shutdown(self) -> None:
        super().shutdown()
        self.node.close()
        self.journal.close()

    # -- what subclasses fill in ----------------------------------------

    def handle(self, msg: Message, tx: Transaction) -> None:
        """Apply one journaled message inside ``tx``; raise InvalidPayload to dead-letter it."""
        raise NotImplementedError

    def prepare(self, msg: Message) -> Callable[[Transaction], None]:
        """With ``prepares``: the slow part, outside any transaction; returns the commit.

        Raise InvalidPayload to dead-letter the message, RetryableError to try later.
        """
        raise NotImplementedError

    def prepare_many(self, msgs: list[Message]) -> list[Callable[[Transaction], None] | Exception]:
        """With ``prepares_many``: ``prepare`` for several messages at once, returning for
        each (in order) its commit or the exception that dead-letters it; raise a
        RetryableError to try them all later."""
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
