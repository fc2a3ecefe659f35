"""The instant provider: answers at once, without a model. For benchmarks only.

``benchmarks/bench_pipeline.py`` measures what the pipeline itself costs (bus, journal,
router, ledger, validation) with the model call taken out: this provider returns the
smallest answer the request's JSON schema accepts (each string its field's title, padded
or cut to the length limits; each list its minimum number of items; each enum its first
value), built once per schema. It reports no tokens: no model read or wrote any.

It is never chosen by accident: the shipped policy does not name it, and a policy that
does is a ConfigError unless ``TRINITY_INSTANT_PROVIDER=1`` is set as well, which only
the benchmark does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.errors import ConfigError, InvalidModelOutput, ModelTimeout

ENABLE_VAR = "TRINITY_INSTANT_PROVIDER"
MODEL = "instant"
# Schema objects whose answer is kept by identity (the agents use a handful).
_MAX_SCHEMAS = 64


def minimal_instance(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
                     title: str = "value") -> Any:
    """The smallest value ``schema`` accepts (the JSON-schema subset pydantic writes for
    the answer shapes: objects, arrays, strings, numbers, enums, ``$ref`` to ``$defs``)."""
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        return minimal_instance(root.get("$defs", {})[name], root, name)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {key: minimal_instance(props[key], root, str(props[key].get("title", key)))
                for key in schema.get("required", [])}
    if kind == "array":
        items = schema.get("items", {})
        return [minimal_instance(items, root, f"{title} {n}")
                for n in range(1, int(schema.get("minItems", 0)) + 1)]
    if kind == "string":
        text = str(schema.get("title", title))
        text = text.ljust(int(schema.get("minLength", 0)), ".")
        return text[: int(schema.get("maxLength", len(text)))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    raise InvalidModelOutput(f"instant provider: no answer for schema {dict(schema)!r}")


class InstantProvider:
    kind = "instant"
    local = True
    price_model: str | None = None
    price_provider: str | None = None

    def __init__(self, name: str, *, env: Mapping[str, str], source: str) -> None:
        if env.get(ENABLE_VAR) != "1":
            raise ConfigError(
                f"{source}: providers.{name} has kind 'instant', which answers without a "
                f"model and is for benchmarks only; set {ENABLE_VAR}=1 to use it")
        self.name = name
        self.model = MODEL
        self._answers: dict[int, tuple[Any, str]] = {}

    def unavailable_reason(self) -> str | None:
        return None

    def complete_cooperating(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event,
        tick: Callable[[], None],
    ) -> Completion:
        """``complete`` on the caller's thread: it never waits, so ``tick`` is not called."""
        return self.complete(request, timeout_s=timeout_s, cancel=cancel)

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion:
        if cancel.is_set():
            raise ModelTimeout(f"{self.name}: cancelled")
        # Kept by the schema object (callers pass the same shared one each time; it is
        # kept with its answer, so its id cannot be reused): dumping the schema to JSON
        # as a key on every call cost more than the rest of the answer.
        known = self._answers.get(id(request.schema))
        if known is not None and known[0] is request.schema:
            content = known[1]
        else:
            content = json.dumps(minimal_instance(request.schema or {"type": "object"}))
            if len(self._answers) < _MAX_SCHEMAS:
                self._answers[id(request.schema)] = (request.schema, content)
        return Completion(content, TokenUsage(0, 0), self.model, "stop")

    def close(self) -> None:
        pass
