"""The exceptions Trinity raises.

    TrinityError
    ├── ConfigError            invalid settings or topology; raised before anything starts
    ├── BusError               the durable bus
    │   ├── MalformedMessage   a frame set that is not a valid message (dead-lettered)
    │   └── JournalError       the SQLite journal could not be read or written
    └── AgentError
        ├── InvalidPayload     a well-formed message whose payload the handler rejects
        └── RetryableError     a transient failure: the message is retried, not dead-lettered
    └── ModelError             a model call failed (one attempt; the router retries or falls back)
        ├── ModelTimeout       no answer within the call's timeout
        ├── ModelUnavailable   connection refused, server gone, provider cooling down
        ├── ModelHTTPError     the server answered with an error status
        ├── InvalidModelOutput the answer is not JSON, or not the requested schema
        └── AllModelsFailed    every provider in the route failed (carries the attempts)

Third-party errors (sqlite3, zmq, openai, ollama, llama.cpp) are mapped to these at the
module boundary.
"""

from __future__ import annotations

from typing import Any


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


class ModelError(TrinityError):
    """One model call attempt failed; ``error_class`` is what the cost ledger records."""

    error_class = "error"


class ModelTimeout(ModelError):
    error_class = "timeout"


class ModelUnavailable(ModelError):
    error_class = "unavailable"


class ModelHTTPError(ModelError):
    error_class = "http_error"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidModelOutput(ModelError):
    error_class = "invalid_output"


class AllModelsFailed(ModelError):
    error_class = "all_failed"

    def __init__(self, message: str, attempts: list[Any] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []
