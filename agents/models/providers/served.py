"""The embedded model, called in the shared model server (``trinity model-server``).

What a model agent holds for it is one ZeroMQ DEALER socket per call: no numpy, no
llama.cpp, no model pages. Each call is a request frame and a reply frame (the wire is
described in ``trinity.agents.models.serve``); the provider keeps the embedded
provider's contract: ``ModelTimeout`` when no answer came in time or ``cancel`` was set
(the server is then told to stop generating), the server's own error class otherwise.

A server that is not running yet (supervisord starts every program at once) or is being
restarted is waited for: ZeroMQ holds the request until the socket connects. A call
that found no server within its time is ``ModelUnavailable``, so the router's retries,
cooldown and fallback treat it as they treat an unreachable server.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.agents.models.providers.model_file import (
    DEFAULT_MODEL,
    DEFAULT_N_CTX,
    shipped_model_path,
)
from trinity.errors import (
    ConfigError,
    InvalidModelOutput,
    ModelError,
    ModelTimeout,
    ModelUnavailable,
)

# How long past the call's own time the server's answer is still waited for (the server
# enforces the time itself and answers "timeout"; this covers the frames in flight).
GRACE_S = 2.0
# How often a waiting call looks at its cancel flag.
_TICK_MS = 50
_ERRORS: dict[str, type[ModelError]] = {
    cls.error_class: cls for cls in (ModelTimeout, ModelUnavailable, InvalidModelOutput)}


def _nothing() -> None:
    """The tick of a call made with ``complete``: its caller does nothing meanwhile."""


def served_spec(model: str, model_path: str | None, n_ctx: int, n_threads: int | None, *,
                name: str = "embedded") -> dict[str, Any]:
    """What a call asks the server to run, the model file resolved. Checked here, as the
    embedded provider checks it: a missing file stops the agent at start with the
    provider's name, not at its first call."""
    path = Path(model_path) if model_path else shipped_model_path()
    if not path.is_file():
        raise ConfigError(f"provider {name}: model file {path} does not exist")
    return {"model": model, "model_path": str(path), "n_ctx": n_ctx, "n_threads": n_threads}


def monitor_event(frames: list[bytes]) -> int:
    """The event of a ZeroMQ socket-monitor message: its first frame is a 16-bit event
    and a 32-bit value in native byte order, its second the endpoint. (pyzmq's
    ``recv_monitor_message`` says the same, but its module imports asyncio: ~5.6 MB in
    each model agent.)"""
    if len(frames) < 2 or len(frames[0]) != 6:
        raise ValueError(f"not a socket-monitor message: {len(frames)} frames, the first "
                         f"of {len(frames[0]) if frames else 0} bytes")
    event: int = struct.unpack("=Hi", frames[0])[0]
    return event


class ServedProvider:
    kind = "embedded"
    local = True
    price_model: str | None = None
    price_provider: str | None = None

    def __init__(self, name: str = "embedded", *, endpoint: str, model: str = DEFAULT_MODEL,
                 model_path: str | None = None, n_ctx: int = DEFAULT_N_CTX,
                 n_threads: int | None = None) -> None:
        self.name = name
        self.model = model
        self.endpoint = endpoint
        self.spec = served_spec(model, model_path, n_ctx, n_threads, name=name)
        self._context: Any = zmq.Context.instance()

    def unavailable_reason(self) -> str | None:
        return None

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion:
        return self.complete_cooperating(request, timeout_s=timeout_s, cancel=cancel,
                                         tick=_nothing)

    def complete_cooperating(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event,
        tick: Callable[[], None],
    ) -> Completion:
        """``complete`` on the caller's thread: ``tick`` is called every poll (at most
        every 50 ms) while the answer is waited for."""
        request_id = uuid.uuid4().hex
        socket = self._context.socket(zmq.DEALER)
        socket.linger = 0
        # Told when the connection comes and goes: a server killed during the call is
        # known at once, not at the call's deadline.
        monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            socket.connect(self.endpoint)
            socket.send(json.dumps({
                "id": request_id, "spec": self.spec, "messages": list(request.messages),
                "schema": request.schema, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "seed": request.seed,
                "timeout_s": timeout_s,
            }).encode())
            reply = self._wait(socket, monitor, request_id,
                               time.monotonic() + timeout_s + GRACE_S, cancel, timeout_s, tick)
        finally:
            socket.disable_monitor()
            monitor.close()
            socket.close()
        return self._completion(reply)

    def _went_away(self, monitor: Any, connected: list[bool]) -> bool:
        """Whether the monitor says a connection to the server ended (after one began)."""
        while monitor.poll(0):
            event = monitor_event(monitor.recv_multipart())
            if event == zmq.EVENT_CONNECTED:
                connected.append(True)
            elif event == zmq.EVENT_DISCONNECTED and connected:
                return True
        return False

    def _wait(self, socket: Any, monitor: Any, request_id: str, deadline: float,
              cancel: threading.Event, timeout_s: float,
              tick: Callable[[], None]) -> dict[str, Any]:
        connected: list[bool] = []
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(_TICK_MS))
            tick()
            if socket in ready:
                try:
                    reply = json.loads(socket.recv())
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise InvalidModelOutput(f"{self.name}: the model server's reply is not "
                                             f"JSON: {exc}") from None
                if isinstance(reply, dict) and reply.get("id") == request_id:
                    return reply
                continue
            if monitor in ready and self._went_away(monitor, connected):
                raise ModelUnavailable(f"{self.name}: the model server at {self.endpoint} "
                                       "went away during the call (restarted or killed)")
            if cancel.is_set() or time.monotonic() > deadline:
                socket.send(json.dumps({"id": request_id, "cancel": True}).encode())
                if cancel.is_set():
                    raise ModelTimeout(f"{self.name}: cancelled")
                raise ModelUnavailable(f"{self.name}: no answer from the model server at "
                                       f"{self.endpoint} within {timeout_s:g} s (is the "
                                       "`models` program running?)")

    def _completion(self, reply: dict[str, Any]) -> Completion:
        if reply.get("ok") is not True:
            message = str(reply.get("message") or "the model server refused the call")
            error = _ERRORS.get(str(reply.get("error")))
            if error is None:  # refused as a request, or the model would not load
                raise ModelError(f"{self.name}: {message}")
            raise error(message)
        try:
            return Completion(
                content=str(reply["content"]),
                usage=TokenUsage(int(reply["input_tokens"]), int(reply["output_tokens"])),
                model=str(reply.get("model") or self.model),
                finish_reason=reply.get("finish_reason"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidModelOutput(f"{self.name}: the model server's reply lacks "
                                     f"{exc}") from None

    def close(self) -> None:
        """Nothing is held between calls."""
