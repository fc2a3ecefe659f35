"""The shared model server (``trinity model-server``) and the provider that calls it.

A real server process on a real ipc socket, with the shipped model: its answers are the
embedded provider's own, its time limits and cancels hold, a missing or restarted
server is waited for or reported, and bad requests get a reason and leave it serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from tests.conftest import BIN, modules_imported, wait_for
from trinity.agents.models.policy import build_providers, load_policy
from trinity.agents.models.providers.base import ChatRequest
from trinity.agents.models.providers.embedded import EmbeddedProvider
from trinity.agents.models.providers.model_file import DEFAULT_MODEL, DEFAULT_N_CTX
from trinity.agents.models.providers.served import ServedProvider, served_spec
from trinity.agents.models.router import WaitsCooperatively
from trinity.agents.models.serve import MAX_REQUEST_BYTES, call_threads
from trinity.controller.process.run_driver import model_server_pid
from trinity.errors import ConfigError, ModelTimeout, ModelUnavailable
from trinity.settings import Settings

SCHEMA = {"type": "object", "properties": {"plan": {"type": "string"},
                                           "steps": {"type": "array",
                                                     "items": {"type": "string"}}},
          "required": ["plan", "steps"]}
MESSAGES = ({"role": "system", "content": "You plan fixes for a code base. Answer in JSON."},
            {"role": "user", "content": "critical_error: database connection refused in "
                                        "payments/db.py line 42"})


class Server:
    """``trinity model-server`` for the project folder ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
        self.env["TRINITY_DATA_DIR"] = str(root)
        self.settings = Settings.from_env(self.env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        path = self.settings.log_dir / "trinity.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def start(self) -> None:
        self.proc = subprocess.Popen([str(BIN / "trinity"), "model-server"], env=self.env,
                                     cwd=self.root, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: "model server listening" in self.log, 30, "the model server")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def provider(self) -> ServedProvider:
        return ServedProvider(endpoint=Settings.from_env(
            {**self.env, "TRINITY_MODEL_SERVER": "on"}).model_server_endpoint or "")


@contextlib.contextmanager
def serving(root: Path) -> Iterator[Server]:
    """A started server for ``root``, killed afterwards unless a test stopped it."""
    served = Server(root)
    served.start()
    try:
        yield served
    finally:
        if served.proc is not None:
            served.stop(signal.SIGKILL)


@pytest.fixture
def server(short_dir: Path) -> Iterator[Server]:
    """A server of the test's own, for the tests that kill or stop it."""
    with serving(short_dir) as served:
        yield served


@pytest.fixture(scope="module")
def running() -> Iterator[Server]:
    """One server for the tests that only call it (each start loads the model)."""
    root = Path(tempfile.mkdtemp(prefix="tr", dir="/tmp"))
    try:
        with serving(root) as served:
            yield served
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ask(provider: object, max_tokens: int = 48, seed: int = 0, timeout_s: float = 60,
        cancel: threading.Event | None = None) -> object:
    request = ChatRequest(messages=MESSAGES, schema=SCHEMA, max_tokens=max_tokens, seed=seed)
    return provider.complete(request, timeout_s=timeout_s,  # type: ignore[attr-defined]
                             cancel=cancel or threading.Event())


def test_a_served_answer_is_the_embedded_provider_s_own(running: Server) -> None:
    """Same request, same seed: the same text and the same token counts as llama.cpp in
    this process (with the server's thread count: the answer does not depend on it)."""
    here = EmbeddedProvider(n_threads=call_threads(1))
    try:
        for seed in (0, 7):
            direct = ask(here, seed=seed)
            served = ask(running.provider(), seed=seed)
            assert served == direct
    finally:
        here.close()


def test_the_routing_chooses_the_server_when_one_is_named(short_dir: Path) -> None:
    policy = load_policy(None)
    served = build_providers(policy, {}, "ipc:///tmp/nowhere.sock")["embedded"]
    assert isinstance(served, ServedProvider) and served.kind == "embedded" and served.local
    assert isinstance(build_providers(policy, {})["embedded"], EmbeddedProvider)


def test_a_call_past_its_time_is_a_timeout_and_the_server_serves_the_next(
        running: Server) -> None:
    with pytest.raises(ModelTimeout, match="no answer within"):
        ask(running.provider(), max_tokens=400, timeout_s=0.2)
    assert ask(running.provider()).usage.output_tokens > 0  # type: ignore[attr-defined]


def test_a_cancelled_call_stops_generating(running: Server) -> None:
    """The agent gives up (its cancel flag): the call ends at once, and the server is
    told, so the next call is not kept waiting behind a long answer nobody wants."""
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match="cancelled"):
        ask(running.provider(), max_tokens=900, timeout_s=60, cancel=cancel)
    assert time.monotonic() - started < 5
    started = time.monotonic()
    ask(running.provider(), max_tokens=8)
    # 900 tokens take well over 10 s here; a short answer after the cancel does not.
    assert time.monotonic() - started < 10


def test_a_call_on_the_caller_s_thread_ticks_while_it_waits_and_a_tick_can_stop_it(
        running: Server) -> None:
    """The served provider is cooperative: the router runs it on the agent's own thread,
    and it calls ``tick`` between its polls, so the agent keeps beating during a long
    answer. A tick that sees a stop request sets the cancel flag, which ends the call."""
    provider = running.provider()
    assert isinstance(provider, WaitsCooperatively)
    cancel = threading.Event()
    ticks: list[tuple[float, int]] = []

    def tick() -> None:
        ticks.append((time.monotonic(), threading.get_ident()))
        if len(ticks) == 20:  # what the agent's tick does once it is asked to stop
            cancel.set()

    request = ChatRequest(messages=MESSAGES, schema=SCHEMA, max_tokens=900)
    with pytest.raises(ModelTimeout, match="cancelled"):
        provider.complete_cooperating(request, timeout_s=60, cancel=cancel, tick=tick)
    assert len(ticks) == 20
    assert {ident for _, ident in ticks} == {threading.get_ident()}
    # every 50 ms while it waits; a busy machine may stretch one poll, never to seconds
    gaps = [b - a for (a, _), (b, _) in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < 1.0, gaps
    ask(provider, max_tokens=8)  # the server was told, and serves the next call


def test_no_server_is_unavailable_and_names_the_program(short_dir: Path) -> None:
    provider = Server(short_dir).provider()
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="is the `models` program running"):
        ask(provider, timeout_s=0.1)
    assert time.monotonic() - started < 5


def test_a_call_sent_before_the_server_starts_is_answered(short_dir: Path) -> None:
    """supervisord starts every program at once: a model agent's first call may go out
    before the server listens; ZeroMQ holds it until the server is there."""
    served = Server(short_dir)
    result: list[object] = []
    caller = threading.Thread(target=lambda: result.append(ask(served.provider())))
    caller.start()
    time.sleep(0.5)
    served.start()
    try:
        caller.join(timeout=60)
        assert result and result[0].usage.output_tokens > 0  # type: ignore[attr-defined]
    finally:
        served.stop()


def test_a_server_killed_during_a_call_is_known_at_once(server: Server) -> None:
    """kill -9 of the server mid-answer: the call fails as unavailable (the router then
    retries or falls back) in a moment, not at its 60 s deadline."""
    assert server.proc is not None
    threading.Timer(0.5, server.proc.kill).start()
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="went away during the call"):
        ask(server.provider(), max_tokens=900, timeout_s=60)
    assert time.monotonic() - started < 5
    server.proc.wait(timeout=10)
    server.proc = None


def test_a_restarted_server_serves_the_same_provider(server: Server) -> None:
    provider = server.provider()
    first = ask(provider)
    server.stop(signal.SIGKILL)
    server.start()
    assert ask(provider) == first


def raw_call(endpoint: str, frames: list[bytes]) -> dict[str, object]:
    context: Any = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(endpoint)
    try:
        socket.send_multipart(frames)
        assert socket.poll(30_000), "no reply from the model server"
        reply = json.loads(socket.recv())
        assert isinstance(reply, dict)
        return reply
    finally:
        socket.close()


GOOD = {"id": "r1", "spec": served_spec(DEFAULT_MODEL, None, DEFAULT_N_CTX, 1),
        "messages": list(MESSAGES), "schema": SCHEMA, "max_tokens": 8, "temperature": 0.2,
        "seed": 0, "timeout_s": 30}


@pytest.mark.parametrize(("frames", "reason"), [
    ([b"{not json"], "request is not JSON"),
    ([b"\xff\xfe\x00binary"], "request is not JSON"),
    ([b"[1, 2]"], "JSON object with a string id"),
    ([b"x" * (MAX_REQUEST_BYTES + 1)], "is over"),
    ([b"{}", b"{}"], "expected one frame, got 2"),
    ([json.dumps({**GOOD, "messages": "hello"}).encode()], "messages must be a list"),
    ([json.dumps({**GOOD, "max_tokens": "8"}).encode()], "max_tokens has the wrong type"),
    ([json.dumps({**GOOD, "timeout_s": -1}).encode()], "timeout_s must be"),
    ([json.dumps({**GOOD, "spec": {"model": 3}}).encode()], "spec.model has the wrong type"),
])
def test_a_bad_request_gets_its_reason_and_the_server_goes_on(
        running: Server, frames: list[bytes], reason: str) -> None:
    endpoint = running.provider().endpoint
    reply = raw_call(endpoint, frames)
    assert reply["ok"] is False and reply["error"] == "invalid_request"
    assert reason in str(reply["message"])
    assert any("refused a request" in line and reason in line
               for line in running.log.splitlines())
    assert running.proc is not None and running.proc.poll() is None
    assert ask(running.provider(), max_tokens=4).usage.output_tokens > 0  # type: ignore[attr-defined]


def test_a_model_file_that_is_not_there_stops_the_agent_at_start() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ServedProvider(endpoint="ipc:///tmp/x.sock", model_path="/nonexistent/model.gguf")


def test_the_controller_finds_the_server_s_pid_and_not_a_stale_one(
        server: Server, short_dir: Path) -> None:
    """The pid file names the server while it runs; a file left by a killed server whose
    pid now belongs to another process is not taken for it."""
    pid_file = server.settings.model_server_pid_file
    assert server.proc is not None
    assert model_server_pid(pid_file) == server.proc.pid
    server.stop()
    assert not pid_file.exists()  # a server that stops removes it
    pid_file.write_text(str(os.getpid()), encoding="utf-8")
    assert psutil.pid_exists(os.getpid()) and model_server_pid(pid_file) is None
    pid_file.write_text("not a pid", encoding="utf-8")
    assert model_server_pid(pid_file) is None


@pytest.mark.parametrize(("value", "endpoint"), [
    ("", None), ("off", None), ("on", "ipc://{run}/models.sock"),
    ("ipc:///tmp/m.sock", "ipc:///tmp/m.sock"), ("tcp://127.0.0.1:5599", "tcp://127.0.0.1:5599"),
])
def test_the_model_server_setting(short_dir: Path, value: str, endpoint: str | None) -> None:
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_MODEL_SERVER": value})
    expected = endpoint.format(run=settings.run_dir) if endpoint else None
    assert settings.model_server_endpoint == expected


@pytest.mark.parametrize(("value", "message"), [
    ("tcp://10.1.2.3:5599", "on this machine"),
    ("maybe", "only ipc:// and tcp:// are supported"),
])
def test_a_bad_model_server_setting_is_one_clear_error(short_dir: Path, value: str,
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=f"TRINITY_MODEL_SERVER.*{message}"):
        Settings.from_env({"TRINITY_DATA_DIR": str(short_dir), "TRINITY_MODEL_SERVER": value})


def test_a_monitor_message_reads_as_pyzmq_reads_it(short_dir: Path) -> None:
    """The provider parses socket-monitor messages itself (pyzmq's parser imports
    asyncio); on real connect and disconnect events it reads what pyzmq reads."""
    from zmq.utils.monitor import parse_monitor_message

    from trinity.agents.models.providers.served import monitor_event

    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.bind(f"ipc://{short_dir}/mon.sock")
    client = ctx.socket(zmq.DEALER)
    monitor = client.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        client.connect(f"ipc://{short_dir}/mon.sock")
        assert monitor.poll(5000)
        frames = monitor.recv_multipart()
        server.close(linger=0)
        assert monitor.poll(5000)
        gone = monitor.recv_multipart()
        assert [monitor_event(f) for f in (frames, gone)] == [
            parse_monitor_message(f)["event"] for f in (frames, gone)]
        assert monitor_event(frames) == zmq.EVENT_CONNECTED
        assert monitor_event(gone) == zmq.EVENT_DISCONNECTED
        with pytest.raises(ValueError, match="not a socket-monitor message"):
            monitor_event([b"\x01"])
    finally:
        client.disable_monitor()
        monitor.close(linger=0)
        client.close(linger=0)
        server.close(linger=0)


def test_a_served_model_agent_loads_neither_the_model_nor_heavy_modules() -> None:
    """ARCHITECT and EXECUTOR served by the model server: no numpy, llama.cpp, pydantic or
    asyncio in them (~50 MB of memory in each model agent together)."""
    code = ("import trinity.cli; from trinity.agents.architect import Architect; "
            "from trinity.agents.executor import Executor; "
            "from trinity.agents.models.providers.served import ServedProvider")
    assert modules_imported(code, ("numpy", "llama_cpp", "pydantic", "asyncio")) == []
