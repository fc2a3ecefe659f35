"""The provider contract: one chat call in, one :class:`Completion` (or a ModelError) out."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from trinity.errors import InvalidModelOutput

Message = dict[str, str]


@dataclass(frozen=True)
class ChatRequest:
    """What to ask: the chat messages, the JSON schema of the answer, and limits."""

    messages: tuple[Message, ...]
    schema: dict[str, Any] | None = None
    max_tokens: int = 256
    temperature: float = 0.2
    seed: int = 0

    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # True when the provider did not report usage and the tokens were counted here.
    estimated: bool = False


@dataclass(frozen=True)
class Completion:
    content: str
    usage: TokenUsage
    model: str
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        """The answer parsed as JSON, or InvalidModelOutput saying why not."""
        try:
            return json.loads(self.content)
        except (json.JSONDecodeError, RecursionError) as exc:
            cut = " (cut at max_tokens)" if self.finish_reason == "length" else ""
            raise InvalidModelOutput(f"answer is not JSON{cut}: {exc}") from None


class Provider(Protocol):
    """A configured model endpoint.

    ``complete`` raises :class:`ModelTimeout` when no answer came within ``timeout_s``
    or ``cancel`` was set, :class:`ModelUnavailable` when the server cannot be reached,
    :class:`ModelHTTPError` for an error status, :class:`InvalidModelOutput` for an
    answer that is not usable; nothing else.
    """

    name: str
    kind: str
    model: str
    local: bool
    # How the cost ledger prices this provider's tokens (genai-prices ids); None = $0.00.
    price_model: str | None
    price_provider: str | None

    def unavailable_reason(self) -> str | None:
        """Why this provider cannot be used at all (no key, no host), or None."""
        ...

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion: ...

    def close(self) -> None: ...
