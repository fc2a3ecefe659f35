"""``trinity model-server``: the embedded model in one process, for every model agent.

Each model agent loading the model itself holds its own llama.cpp context (KV cache,
compute buffer), its own vocabulary tables (~16 MB of C++ maps) and half of the mapped
weights, plus numpy and llama-cpp-python: ~95 MB of PSS per model agent beyond what the
agent needs. Served, they are held once, and the model agents carry only a ZeroMQ socket
(``providers.served``). supervisord runs this as the ``models`` program; the model agents
use it when ``TRINITY_MODEL_SERVER`` is set (the shipped ``supervisor.conf`` sets it).

The wire: a ROUTER socket; each request and each reply one JSON frame.

- request ``{"id", "spec": {model, model_path, n_ctx, n_threads}, "messages", "schema",
  "max_tokens", "temperature", "seed", "timeout_s"}``: the answer within ``timeout_s`` of
  its arrival, time spent waiting behind other calls included;
- ``{"id", "cancel": true}``: stop that call (the agent gave up on it);
- reply ``{"id", "ok": true, "content", "input_tokens", "output_tokens", "model",
  "finish_reason"}`` or ``{"id", "ok": false, "error": <ModelError class>, "message"}``.

One call is generated at a time, in arrival order, on a worker thread; the main thread
keeps reading, so a cancel reaches the call it names between two tokens. A reply for an
agent that has gone (it timed out, or was restarted) is dropped by the ROUTER socket.
The providers are keyed by their spec, so whatever the agents' routing names is what is
loaded (the first call loads it, ~0.3 s), and a malformed request gets an error reply
and a log line, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from trinity.agents.models.providers.base import ChatRequest
from trinity.errors import ConfigError, InvalidModelOutput, ModelError, ModelTimeout
from trinity.files import atomic_write_bytes
from trinity.memory import limit_malloc_arenas
from trinity.settings import Settings

log = logging.getLogger(__name__)

# What a request may hold; anything larger is refused before it is parsed.
MAX_REQUEST_BYTES = 1 << 20
# The spec fields that choose (and key) a provider, and their types.
SPEC_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str, "model_path": (str, type(None)), "n_ctx": int, "n_threads": (int, type(None)),
}
_WAKE = "inproc://model-server-done"
_POLL_MS = 500


class BadRequest(ValueError):
    """A request that cannot be served: its reason goes back to the caller."""


@dataclass
class _Job:
    identity: bytes
    request_id: str
    spec: tuple[Any, ...]
    request: ChatRequest
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)


def call_threads(n_threads: int | None) -> int:
    """Threads for one call here. The routing's ``n_threads`` is sized for a model agent
    that runs the model itself, beside the other one (1 each on two cores); the server
    runs one call at a time, so it gives each call every core (up to 4, llama.cpp's
    point of no return for a model this small), and never fewer than the routing asks.

    Measured on two cores, a compressed 6-hour run: 1 thread, 75 s; 2 threads, 60 s;
    (each model agent with its own model, 1 thread each: 46 s, at ~95 MB more PSS)."""
    return max(n_threads or 1, min(4, os.cpu_count() or 1))


def spec_key(spec: Any) -> tuple[Any, ...]:
    if not isinstance(spec, dict):
        raise BadRequest("spec must be an object")
    key = []
    for name, kind in SPEC_FIELDS.items():
        value = spec.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadRequest(f"spec.{name} has the wrong type ({type(value).__name__})")
        key.append(value)
    return tuple(key)


def parse_request(frame: bytes) -> dict[str, Any]:
    """The request's JSON object with an ``id``, or BadRequest saying what is wrong."""
    if len(frame) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request of {len(frame)} bytes is over {MAX_REQUEST_BYTES}")
    try:
        data = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise BadRequest("request must be a JSON object with a string id")
    return data


def chat_request(data: dict[str, Any]) -> ChatRequest:
    messages = data.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise BadRequest("messages must be a list of {role, content} objects")
    schema = data.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise BadRequest("schema must be an object or null")
    for name, kind in (("max_tokens", int), ("seed", int), ("temperature", (int, float))):
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise BadRequest(f"{name} has the wrong type ({type(data.get(name)).__name__})")
    return ChatRequest(messages=tuple(messages), schema=schema, max_tokens=data["max_tokens"],
                       temperature=float(data["temperature"]), seed=data["seed"])


def error_reply(request_id: str | None, exc: Exception) -> dict[str, Any]:
    kind = exc.error_class if isinstance(exc, ModelError) else "invalid_request"
    return {"id": request_id, "ok": False, "error": kind, "message": str(exc)}


class ModelServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.endpoint = settings.model_server_bind
        self.providers: dict[tuple[Any, ...], Any] = {}
        self.waiting: deque[_Job] = deque()
        self.running: _Job | None = None
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.stopping = False
        self.served = 0
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.wake = self.context.socket(zmq.PULL)
        self.wake.linger = 0
        self.worker: threading.Thread | None = None

    # -- the provider, on the worker thread ---------------------------------------------

    def provider(self, spec: tuple[Any, ...]) -> Any:
        from trinity.agents.models.providers.embedded import EmbeddedProvider

        if spec not in self.providers:
            model, model_path, n_ctx, n_threads = spec
            self.providers[spec] = EmbeddedProvider(
                "embedded", model=model, model_path=model_path, n_ctx=n_ctx,
                n_threads=call_threads(n_threads))
        return self.providers[spec]

    def preload(self) -> None:
        """Load what the routing policy's embedded providers name, before the first call:
        the first answer is not ~0.3 s late, and the memory the controller samples is the
        server's whole working set from the start."""
        from trinity.agents.models.policy import embedded_spec, load_policy
        from trinity.agents.models.providers.served import served_spec

        try:
            policy = load_policy(self.settings.routing_path)
            for spec in policy.providers.values():
                if spec["kind"] == "embedded":
                    self.provider(spec_key(served_spec(**embedded_spec(spec))))._load()
        except ConfigError as exc:  # the agents stop on it too; calls get it as an error
            log.error("model server: nothing preloaded: %s", exc)

    def _work(self) -> None:
        done = self.context.socket(zmq.PUSH)
        done.linger = 0
        done.connect(_WAKE)
        try:
            while (job := self.jobs.get()) is not None:
                done.send(json.dumps(self._serve(job)).encode())
        finally:
            done.close()

    def _serve(self, job: _Job) -> dict[str, Any]:
        left = job.deadline - time.monotonic()
        try:
            if left <= 0:
                raise ModelTimeout("model server: no answer within the call's time "
                                   "(it waited behind other calls)")
            completion = self.provider(job.spec).complete(
                job.request, timeout_s=left, cancel=job.cancel)
        except (ModelError, ConfigError) as exc:
            return error_reply(job.request_id, exc)
        except Exception as exc:  # noqa: BLE001 - one call's failure is its caller's
            log.exception("model server: call %s failed", job.request_id)
            return error_reply(job.request_id, InvalidModelOutput(
                f"model server: {type(exc).__name__}: {exc}"))
        return {"id": job.request_id, "ok": True, "content": completion.content,
                "input_tokens": completion.usage.input_tokens,
                "output_tokens": completion.usage.output_tokens,
                "model": completion.model, "finish_reason": completion.finish_reason}

    # -- the main thread: requests in, replies out --------------------------------------

    def _receive(self) -> None:
        identity, *frames = self.socket.recv_multipart()
        request_id = None
        try:
            if len(frames) != 1:
                raise BadRequest(f"expected one frame, got {len(frames)}")
            data = parse_request(frames[0])
            request_id = data["id"]
            if data.get("cancel") is True:
                self._cancel(identity, request_id)
                return
            timeout_s = data.get("timeout_s")
            if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) \
                    or not 0 < timeout_s < 86400:
                raise BadRequest("timeout_s must be a number of seconds > 0")
            job = _Job(identity, request_id, spec_key(data.get("spec")), chat_request(data),
                       time.monotonic() + float(timeout_s))
        except BadRequest as exc:
            log.error("model server: refused a request (%s)", exc)
            self._reply(identity, error_reply(request_id, exc))
            return
        self.waiting.append(job)

    def _cancel(self, identity: bytes, request_id: str) -> None:
        if self.running is not None and (self.running.identity, self.running.request_id) == (
                identity, request_id):
            self.running.cancel.set()
        self.waiting = deque(j for j in self.waiting
                             if (j.identity, j.request_id) != (identity, request_id))

    def _reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        # A caller that is gone waits for nothing: its answer is dropped.
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([identity, json.dumps(reply).encode()],
                                       flags=zmq.NOBLOCK)

    def _finished(self) -> None:
        reply: dict[str, Any] = json.loads(self.wake.recv())
        job, self.running = self.running, None
        assert job is not None
        self.served += 1
        self._reply(job.identity, reply)

    def _start_next(self) -> None:
        if self.running is None and self.waiting:
            self.running = self.waiting.popleft()
            self.jobs.put(self.running)

    def _request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        limit_malloc_arenas()
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        try:
            self.socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"model server: cannot listen on {self.endpoint}: {exc}") from None
        self.wake.bind(_WAKE)
        self.preload()
        self.worker = threading.Thread(target=self._work, name="model-call", daemon=True)
        self.worker.start()
        # What the controller samples for memory: the server has no heartbeat of its own.
        atomic_write_bytes(self.settings.model_server_pid_file, str(os.getpid()).encode())
        log.info("model server listening on %s", self.endpoint)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        try:
            while not self.stopping:
                ready = dict(poller.poll(_POLL_MS))
                if self.wake in ready:
                    self._finished()
                if self.socket in ready:
                    self._receive()
                self._start_next()
        finally:
            self.close()
        log.info("model server stopped after %d calls", self.served)
        return 0

    def close(self) -> None:
        if self.running is not None:
            self.running.cancel.set()
        self.jobs.put(None)
        if self.worker is not None:
            self.worker.join(timeout=10)
        for provider in self.providers.values():
            provider.close()
        self.socket.close()
        self.wake.close()
        self.context.term()
        self.settings.model_server_pid_file.unlink(missing_ok=True)
