"""Real servers for the provider and router tests.

* :class:`LlamaServer` — llama-cpp-python's own OpenAI-compatible server
  (``python -m llama_cpp.server``) serving the shipped GGUF in a subprocess.
* :class:`OllamaWireServer` — a small HTTP server speaking Ollama's ``/api/tags`` and
  ``/api/chat`` wire format, answering with the real embedded model (llama.cpp in this
  process), so token counts are the model's own.
* :class:`FaultServer` — an HTTP server speaking the OpenAI chat-completions path (and
  Ollama's ``/api/chat``) whose behaviour is programmed per request: sleep past the
  timeout, answer 500, answer 200 with a body that is not JSON, answer 200 with an
  answer that is not the requested schema, or answer well.
* :class:`FormatServer` — the OpenAI chat-completions path, taking only the
  structured-output forms it is told to (``json_schema``, ``json_object``, or none: no
  response_format) and refusing the others as servers do, answering with queued
  contents; usage is counted from the request and the answer.
* :class:`RefusingPort` — an address where nothing listens (connection refused).

Every server binds 127.0.0.1; the in-process ones bind port 0 and read the port back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trinity.agents.models.providers.embedded import shipped_model_path

LLAMA_ALIAS = "smollm2"
OLLAMA_MODEL = "smollm2:135m"


def need(ok: bool, why: str) -> None:
    """Skip when a resource is missing, except in CI (``CI=true``) where that fails."""
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"missing test resource: {why}")
    pytest.skip(why)


def _free_port() -> int:
    """A port nothing listens on right now (the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RefusingPort:
    """A port that refuses connections: bound (so no one else can take it), never
    listening, so a connect gets a reset (ECONNREFUSED). ``close()`` releases it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


# -- llama-cpp-python's OpenAI-compatible server ---------------------------------


class LlamaServer:
    """``python -m llama_cpp.server`` with the shipped GGUF, in a subprocess.

    The server takes a port number, not a socket, so a port is picked by binding port
    0; if another process takes it before the server binds, the server exits and is
    started again on a new port.
    """

    def __init__(self, model_path: Path | None = None, *, n_ctx: int = 2048,
                 ready_timeout_s: float = 60.0, tries: int = 3,
                 alias: str = LLAMA_ALIAS) -> None:
        self.model_path = model_path or shipped_model_path()
        self.alias = alias  # the model name the server answers to
        self.n_ctx = n_ctx
        self.ready_timeout_s = ready_timeout_s
        self.tries = tries
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        for _ in range(self.tries):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                 "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                 "--model_alias", self.alias, "--verbose", "false",
                 # One thread for prompts too (the default is every CPU, whose spinning
                 # threads crawl on a busy machine).
                 "--n_threads", "1", "--n_threads_batch", "1"],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return self
            self._reap()
        raise RuntimeError(f"llama_cpp.server did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited: most likely the port was taken meanwhile
            try:
                models = _get_json(f"{self.base_url}/models", timeout=1.0)
                if any(m.get("id") == self.alias for m in models.get("data", [])):
                    return True
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return False

    def log_tail(self, chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-chars:]

    def _reap(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self._reap()
        self._log.close()


# -- common HTTP plumbing ---------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: Any) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def send_json(self, status: int, payload: Any) -> None:
        self.send(status, json.dumps(payload).encode())


class _Running:
    """Start/stop of an in-process HTTP server on its own thread."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self.httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Any:
        self.httpd = _Server(self.handler, self)
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


# -- Ollama's wire format, real model ---------------------------------------------


class _OllamaHandler(_Handler):
    def do_GET(self) -> None:
        owner: OllamaWireServer = self.server.owner
        if self.path == "/api/tags":
            self.send_json(200, owner.tags())
        elif self.path == "/api/version":
            self.send_json(200, {"version": "0.6.0"})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        owner: OllamaWireServer = self.server.owner
        if self.path != "/api/chat":
            self.send_json(404, {"error": "not found"})
            return
        try:
            body = self.read_json()
        except ValueError:
            self.send_json(400, {"error": "invalid JSON body"})
            return
        if body.get("model") != OLLAMA_MODEL:
            self.send_json(404, {"error": f"model \"{body.get('model')}\" not found, "
                                          "try pulling it first"})
            return
        if body.get("stream", True):
            self.send_json(400, {"error": "this test server answers stream=false only"})
            return
        self.send_json(200, owner.chat(body))


class OllamaWireServer(_Running):
    """``GET /api/tags`` and non-streaming ``POST /api/chat`` as Ollama answers them.

    The answer comes from llama.cpp running the shipped GGUF; ``format`` (a JSON
    schema, or ``"json"``) constrains it, ``options`` gives num_predict, temperature
    and seed. With ``omit_prompt_eval_count`` set the response leaves
    ``prompt_eval_count`` out, as Ollama does when the prompt came from its cache.
    """

    handler = _OllamaHandler

    def __init__(self, model_path: Path | None = None) -> None:
        super().__init__()
        from llama_cpp import Llama

        self.model_path = model_path or shipped_model_path()
        self.llama = Llama(model_path=str(self.model_path), n_ctx=2048, n_threads=1,
                           n_threads_batch=1, verbose=False, seed=0)
        self.lock = threading.Lock()
        self.omit_prompt_eval_count = False
        self.requests: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []

    def tags(self) -> dict[str, Any]:
        stat = self.model_path.stat()
        return {"models": [{
            "name": OLLAMA_MODEL, "model": OLLAMA_MODEL,
            "modified_at": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
            "size": stat.st_size, "digest": "0" * 64,
            "details": {"parent_model": "", "format": "gguf", "family": "llama",
                        "families": ["llama"], "parameter_size": "135M",
                        "quantization_level": "Q4_1"},
        }]}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        fmt = body.get("format")
        response_format: Any = None
        if isinstance(fmt, dict):
            response_format = {"type": "json_object", "schema": fmt}
        elif fmt == "json":
            response_format = {"type": "json_object"}
        started = time.perf_counter_ns()
        with self.lock:
            self.requests.append(body)
            result: Any = self.llama.create_chat_completion(
                messages=body.get("messages") or [],
                response_format=response_format,
                max_tokens=int(options.get("num_predict", 128)),
                temperature=float(options.get("temperature", 0.8)),
                seed=int(options.get("seed", 0)),
            )
        took = time.perf_counter_ns() - started
        choice = result["choices"][0]
        usage = result["usage"]
        answer: dict[str, Any] = {
            "model": body["model"],
            "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "message": {"role": "assistant", "content": choice["message"]["content"] or ""},
            "done": True,
            "done_reason": "length" if choice["finish_reason"] == "length" else "stop",
            "total_duration": took,
            "load_duration": 0,
            "prompt_eval_count": usage["prompt_tokens"],
            "prompt_eval_duration": took // 4,
            "eval_count": usage["completion_tokens"],
            "eval_duration": took - took // 4,
        }
        if self.omit_prompt_eval_count:
            del answer["prompt_eval_count"], answer["prompt_eval_duration"]
        self.responses.append(answer)
        return answer


# -- programmable faults ------------------------------------------------------------

OK = "ok"                    # 200, a well-formed answer (``content``) with usage
SLOW = "slow"                # sleep ``delay_s`` before answering (past the timeout)
HTTP_500 = "http_500"        # 500 with an error body
NOT_JSON = "not_json"        # 200, Content-Type application/json, body not JSON
TEXT_BODY = "text_body"      # 200, Content-Type text/html, body not JSON (a proxy's page)
WRONG_SHAPE = "wrong_shape"  # 200, JSON, but a list rather than a response object
BAD_CONTENT = "bad_content"  # 200, well-formed, but the answer is not the schema's JSON


@dataclass(frozen=True)
class Fault:
    kind: str
    content: str = '{"answer": "yes"}'
    delay_s: float = 5.0
    prompt_tokens: int = 1000
    completion_tokens: int = 500


class _FaultHandler(_Handler):
    def do_POST(self) -> None:
        owner: FaultServer = self.server.owner
        try:
            body = self.read_json()
        except ValueError:
            body = None
        if self.path not in ("/v1/chat/completions", "/api/chat"):
            self.send_json(404, {"error": "not found"})
            return
        fault = owner.next_fault(self.path, body)
        if fault.kind == SLOW:
            owner.stopping.wait(fault.delay_s)
        if fault.kind == HTTP_500:
            self.send_json(500, {"error": {"message": "internal server error (injected)",
                                           "type": "server_error", "code": None}})
        elif fault.kind == NOT_JSON:
            self.send(200, b'{"choices": [{"message": {"content": "cut off')
        elif fault.kind == TEXT_BODY:
            self.send(200, b"<html>upstream proxy error</html>", "text/html")
        elif fault.kind == WRONG_SHAPE:
            self.send_json(200, [{"message": {"content": "{}"}}])
        else:
            content = "sure! here is the answer: yes" if fault.kind == BAD_CONTENT \
                else fault.content
            if self.path == "/api/chat":
                self.send_json(200, _ollama_answer(body or {}, content, fault))
            else:
                self.send_json(200, _openai_answer(body or {}, content, fault))


def _openai_answer(body: dict[str, Any], content: str, fault: Fault) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "unknown"),
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": fault.prompt_tokens,
                  "completion_tokens": fault.completion_tokens,
                  "total_tokens": fault.prompt_tokens + fault.completion_tokens},
    }


def _ollama_answer(body: dict[str, Any], content: str, fault: Fault) -> dict[str, Any]:
    return {
        "model": body.get("model", "unknown"),
        "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "message": {"role": "assistant", "content": content}, "done": True,
        "done_reason": "stop", "total_duration": 1_000_000,
        "prompt_eval_count": fault.prompt_tokens, "eval_count": fault.completion_tokens,
    }


class FaultServer(_Running):
    """Answers each POST with the next queued :class:`Fault`, or ``default`` when the
    queue is empty. ``hits`` counts the requests that arrived (per path)."""

    handler = _FaultHandler

    def __init__(self, default: Fault | None = None) -> None:
        super().__init__()
        self.default = default or Fault(OK)
        self.queue: deque[Fault] = deque()
        self.hits: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return f"{self.url}/v1"

    def program(self, *faults: Fault, default: Fault | None = None) -> None:
        with self._lock:
            self.queue.clear()
            self.queue.extend(faults)
            if default is not None:
                self.default = default

    def next_fault(self, path: str, body: Any) -> Fault:
        with self._lock:
            self.hits.append((path, body))
            return self.queue.popleft() if self.queue else self.default

    def reset(self, default: Fault | None = None) -> None:
        with self._lock:
            self.queue.clear()
            self.hits.clear()
            self.default = default or Fault(OK)


# -- a server that takes some structured-output forms and refuses the others ------------

NO_FORMAT = "none"  # a request without response_format


class _FormatHandler(_Handler):
    def do_POST(self) -> None:
        owner: FormatServer = self.server.owner
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"error": {"message": "not found"}})
            return
        try:
            body = self.read_json()
        except ValueError:
            self.send_json(400, {"error": {"message": "invalid JSON body"}})
            return
        status, payload = owner.answer(body)
        self.send_json(status, payload)


class FormatServer(_Running):
    """``POST /v1/chat/completions`` that takes the forms in ``accepts`` and refuses a
    request with any other response_format, with ``refusal_status`` and an error naming
    the form (as LM Studio and vLLM answer 400, llama_cpp.server 500).

    Accepted requests are answered with the next of ``answers`` (``default_answer``
    when none is left). Usage: a prompt token per 4 characters of the messages, an
    answer token per 4 characters of the answer. ``fail_with`` queues error statuses
    answered first, whatever the form. ``requests`` holds every request body, in order.
    """

    handler = _FormatHandler

    def __init__(self, accepts: set[str], *, refusal_status: int = 400,
                 default_answer: str = '{"answer": "yes"}') -> None:
        super().__init__()
        self.accepts = set(accepts)
        self.refusal_status = refusal_status
        self.default_answer = default_answer
        self.answers: deque[str] = deque()
        self.fail_with: deque[int] = deque()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @staticmethod
    def form_of(body: dict[str, Any]) -> str:
        response_format = body.get("response_format")
        if not isinstance(response_format, dict):
            return NO_FORMAT
        return str(response_format.get("type"))

    def forms_asked(self) -> list[str]:
        with self._lock:
            return [self.form_of(b) for b in self.requests]

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            failure = self.fail_with.popleft() if self.fail_with else None
            form = self.form_of(body)
            if failure is None and form in self.accepts:
                content = self.answers.popleft() if self.answers else self.default_answer
            else:
                content = None
        if failure is not None:
            return failure, {"error": {
                "message": f"HTTP {failure} for a request with response_format (injected)",
                "type": "server_error", "code": None}}
        if content is None:
            return self.refusal_status, {"error": {
                "message": f"response_format type {form!r} is not supported; this server "
                           f"takes {sorted(self.accepts)}",
                "type": "invalid_request_error", "param": "response_format", "code": None}}
        prompt = "".join(str(m.get("content", "")) for m in body.get("messages") or [])
        usage = Fault(OK, prompt_tokens=max(1, len(prompt) // 4),
                      completion_tokens=max(1, len(content) // 4))
        return 200, _openai_answer(body, content, usage)
