"""The exceptions Trinity raises.

    TrinityError
    ├── ConfigError            invalid settings or topology; raised before anything starts
    ├── BusError               the durable bus
    │   ├── MalformedMessage   a frame set that is not a valid message (dead-lettered)
    │   └── JournalError       the SQLite journal could not be read or written
    └── AgentError
        ├── InvalidPayload     a well-formed message whose payload the handler rejects
        └── RetryableError     a transient failure: the message is retried, not dead-lettered

Third-party errors (sqlite3, zmq) are mapped to these at the module boundary.
"""

from __future__ import annotations


class TrinityError(Exception):
    """Root of every error Trinity raises on purpose."""


class ConfigError(TrinityError):
    """A setting or the topology is invalid."""


class BusError(TrinityError):
    """Base for errors of the durable bus."""


class MalformedMessage(BusError):
    """Frames that do not form a valid message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JournalError(BusError):
    """The journal database failed (locked past the busy timeout, corrupt, disk full)."""


class AgentError(TrinityError):
    """Base for errors raised by agent handlers."""


class InvalidPayload(AgentError):
    """A payload the handler cannot accept; the message is dead-lettered with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableError(AgentError):
    """A transient failure: leave the message unapplied and try again later."""
