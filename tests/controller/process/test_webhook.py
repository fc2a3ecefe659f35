"""The alert webhook against real local HTTP servers.

Every server is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 port 0 (the port is read
back), answering each POST as scripted: a status (optionally with ``Retry-After``), or
``"hang"`` — hold the request until the test releases it. Handler threads are joined
when a server stops, and notifiers are closed (their worker gone, their client closed)
before their server stops, so no socket outlives its test.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from trinity.contract import Alert
from trinity.controller.process.webhook import WebhookNotifier
from trinity.errors import ConfigError
from trinity.urls import redact_url, validate_webhook_url

FAST = {"timeout_s": 1.0, "backoff_s": 0.01}


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def settled(notifier: WebhookNotifier, n: int) -> Callable[[], bool]:
    """True once ``n`` alerts are delivered, failed or dropped and nothing is queued."""
    def check() -> bool:
        c = notifier.counters()
        return c["queued"] == 0 and c["delivered"] + c["failed"] + c["dropped"] == n
    return check


# -- a scripted webhook server ----------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread
    block_on_close = True

    def __init__(self, owner: Hook) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up mid-answer (the timeout tests)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection cannot hold server_close() forever
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:
        hook = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = hook.record(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                      json.loads(raw), time.monotonic()))
        headers = {}
        if action == "hang":
            hook.release.wait(hook.hang_s)
            status = 200
        else:
            status = int(action)
            if hook.retry_after is not None and status in (429, 503):
                headers["Retry-After"] = hook.retry_after
        body = b'{"ok": true}'
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client gave up: nothing to answer


class Hook:
    """Answers the n-th POST with ``script[n]`` (the last entry repeats)."""

    def __init__(self, *script: int | str, retry_after: str | None = None,
                 hang_s: float = 30.0) -> None:
        self.script = list(script) or [200]
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.release = threading.Event()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self.httpd = _Server(self)
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def record(self, request: Received) -> int | str:
        with self._lock:
            self.received.append(request)
            return self.script[min(len(self.received) - 1, len(self.script) - 1)]

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def bodies(self) -> list[Any]:
        with self._lock:
            return [r.body for r in self.received]

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str = "/hook", *, auth: str = "") -> str:
        return f"http://{auth}127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours proxy variables; the test servers are local."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def notifiers(serve: Callable[..., Hook]) -> Iterator[Callable[..., WebhookNotifier]]:
    """Notifiers closed, and their workers gone, before any server stops."""
    made: list[WebhookNotifier] = []

    def make(url: str, **kwargs: Any) -> WebhookNotifier:
        notifier = WebhookNotifier(url, **kwargs)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close(0.5)
    for notifier in made:
        wait_until(lambda n=notifier: not n.running, 10, "the webhook worker to exit")


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A port that is bound but never listens: a connect is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


def _alert(i: int) -> dict[str, Any]:
    return Alert.of("test_alert", "warning", f"alert {i}", agent="executor", n=i).payload()


# -- delivery -----------------------------------------------------------------------


def test_alerts_arrive_in_order_as_json_with_headers(serve, notifiers) -> None:
    hook = serve(200)
    notifier = notifiers(hook.url("/hooks/abc?channel=ops"), **FAST)
    alerts = [_alert(i) for i in range(10)]
    for alert in alerts:
        assert notifier.submit(alert) is True
    wait_until(settled(notifier, 10), 10, "10 deliveries")
    assert notifier.counters() == {"delivered": 10, "failed": 0, "dropped": 0, "queued": 0}
    assert hook.bodies() == alerts  # JSON bodies, in submission order, nothing else
    for request in hook.received:
        assert request.path == "/hooks/abc?channel=ops"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == f"trinity/{version('trinity')}"
    assert notifier.close(2.0) is True
    assert not notifier.running


def test_submit_sends_a_snapshot_and_stringifies_non_json_values(serve, notifiers) -> None:
    hook = serve(200)
    notifier = notifiers(hook.url(), **FAST)
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    alert = Alert.of("disk", "error", "disk full", path=Path("/var/x"), when=when).payload()
    assert notifier.submit(alert)
    alert["message"] = "changed after submit"  # AlertLog.write_alert mutates alerts
    alert["source"] = "controller"
    wait_until(settled(notifier, 1), 10, "the delivery")
    (body,) = hook.bodies()
    assert body["message"] == "disk full" and "source" not in body
    assert body["details"] == {"path": "/var/x", "when": str(when)}


def test_5xx_is_retried_until_delivered(serve, notifiers) -> None:
    hook = serve(500, 503, 200)
    notifier = notifiers(hook.url(), max_attempts=3, **FAST)
    alert = _alert(1)
    notifier.submit(alert)
    wait_until(settled(notifier, 1), 10, "the delivery")
    assert notifier.counters() == {"delivered": 1, "failed": 0, "dropped": 0, "queued": 0}
    assert hook.bodies() == [alert, alert, alert]


def test_5xx_forever_fails_after_max_attempts_and_the_worker_goes_on(
        serve, notifiers, caplog: pytest.LogCaptureFixture) -> None:
    hook = serve(500)
    notifier = notifiers(hook.url(), max_attempts=3, **FAST)
    with caplog.at_level(logging.WARNING, logger="trinity.controller.process.webhook"):
        notifier.submit(_alert(1))
        wait_until(settled(notifier, 1), 10, "the first alert to fail")
        assert hook.count() == 3
        notifier.submit(_alert(2))
        wait_until(settled(notifier, 2), 10, "the second alert to fail")
    assert hook.count() == 6
    assert notifier.counters() == {"delivered": 0, "failed": 2, "dropped": 0, "queued": 0}
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(gave_up) == 2 and "after 3 attempt(s): HTTP 500" in gave_up[0]


def test_backoff_grows_exponentially(serve, notifiers) -> None:
    hook = serve(500, 500, 200)
    notifier = notifiers(hook.url(), max_attempts=3, timeout_s=1.0, backoff_s=0.1)
    notifier.submit(_alert(1))
    wait_until(settled(notifier, 1), 10, "the delivery")
    t = [r.at for r in hook.received]
    assert t[1] - t[0] >= 0.09
    assert t[2] - t[1] >= 0.19


def test_429_honours_a_numeric_retry_after(serve, notifiers) -> None:
    hook = serve(429, 200, retry_after="0.4")
    notifier = notifiers(hook.url(), max_attempts=2, **FAST)
    notifier.submit(_alert(1))
    wait_until(settled(notifier, 1), 10, "the delivery")
    assert notifier.counters()["delivered"] == 1
    t = [r.at for r in hook.received]
    assert t[1] - t[0] >= 0.35


def test_retry_after_is_capped(serve, notifiers) -> None:
    hook = serve(503, 200, retry_after="3600")
    notifier = notifiers(hook.url(), max_attempts=2, retry_after_cap_s=0.2, **FAST)
    notifier.submit(_alert(1))
    wait_until(settled(notifier, 1), 5, "the delivery (Retry-After capped)")
    t = [r.at for r in hook.received]
    assert 0.15 <= t[1] - t[0] < 2.0


@pytest.mark.parametrize("status", [400, 401, 404, 410, 301])
def test_4xx_and_redirects_are_not_retried(serve, notifiers, status: int) -> None:
    hook = serve(status, 200)
    notifier = notifiers(hook.url(), max_attempts=3, **FAST)
    notifier.submit(_alert(1))
    wait_until(settled(notifier, 1), 10, "the failure")
    assert notifier.counters() == {"delivered": 0, "failed": 1, "dropped": 0, "queued": 0}
    assert hook.count() == 1


# -- a failing webhook never blocks the caller ----------------------------------------


def test_hanging_server_never_blocks_submit_and_close_is_bounded(serve, notifiers) -> None:
    hook = serve("hang")
    notifier = notifiers(hook.url(), timeout_s=0.2, max_attempts=2, backoff_s=0.01)
    durations = []
    for i in range(100):
        start = time.perf_counter()
        notifier.submit(_alert(i))
        durations.append(time.perf_counter() - start)
    assert max(durations) < 0.05, f"slowest submit {max(durations) * 1000:.1f} ms"
    wait_until(lambda: hook.count() >= 1, 5, "the first request to reach the server")
    start = time.monotonic()
    notifier.close(0.5)
    assert time.monotonic() - start < 0.5 + 0.25
    wait_until(lambda: not notifier.running, 5, "the worker to exit")
    c = notifier.counters()
    assert c["delivered"] == 0 and c["queued"] == 0 and c["failed"] >= 1
    assert c["failed"] + c["dropped"] == 100
    assert notifier.submit(_alert(101)) is False  # closed
    assert notifier.counters()["dropped"] == c["dropped"] + 1


def test_close_returns_even_while_a_request_outlasts_it(serve, notifiers) -> None:
    hook = serve("hang")
    notifier = notifiers(hook.url(), timeout_s=1.5, max_attempts=1, backoff_s=0.01)
    notifier.submit(_alert(1))
    notifier.submit(_alert(2))
    wait_until(lambda: hook.count() == 1, 5, "the request to reach the server")
    start = time.monotonic()
    assert notifier.close(0.2) is False  # the worker is still inside the request
    assert time.monotonic() - start < 0.2 + 0.2
    assert notifier.counters() == {"delivered": 0, "failed": 0, "dropped": 1, "queued": 1}
    wait_until(lambda: not notifier.running, 5, "the worker to time out and exit")
    assert notifier.counters() == {"delivered": 0, "failed": 1, "dropped": 1, "queued": 0}
    assert hook.count() == 1  # no retry, no second alert after close's deadline


def test_close_delivers_what_is_queued_within_its_timeout(serve, notifiers) -> None:
    hook = serve(200)
    notifier = notifiers(hook.url(), **FAST)
    for i in range(20):
        notifier.submit(_alert(i))
    assert notifier.close(5.0) is True
    assert notifier.counters() == {"delivered": 20, "failed": 0, "dropped": 0, "queued": 0}
    assert [b["details"]["n"] for b in hook.bodies()] == list(range(20))
    assert notifier.close(0.1) is True  # idempotent


def test_connection_refused_fails_without_raising(notifiers, refusing_url: str) -> None:
    notifier = notifiers(refusing_url, max_attempts=3, **FAST)
    start = time.perf_counter()
    assert notifier.submit(_alert(1)) is True
    assert time.perf_counter() - start < 0.05
    wait_until(settled(notifier, 1), 10, "the failure")
    assert notifier.counters() == {"delivered": 0, "failed": 1, "dropped": 0, "queued": 0}
    assert notifier.close(2.0) is True


def test_unresolvable_host_never_blocks(notifiers) -> None:
    # .invalid never resolves (RFC 6761); how long a resolver takes to say so is not
    # ours to bound, so only the caller's side is timed.
    notifier = notifiers("http://trinity-webhook-test.invalid/hook", max_attempts=2,
                         **FAST)
    start = time.perf_counter()
    assert notifier.submit(_alert(1)) is True
    assert time.perf_counter() - start < 0.05
    start = time.monotonic()
    notifier.close(3.0)
    assert time.monotonic() - start < 3.0 + 0.25
    wait_until(lambda: not notifier.running, 60, "the worker to exit")
    assert notifier.counters()["delivered"] == 0
    assert sum(notifier.counters().values()) == 1


# -- the bounded queue --------------------------------------------------------------


def test_full_queue_drops_the_oldest_and_counts_it(
        serve, notifiers, caplog: pytest.LogCaptureFixture) -> None:
    hook = serve("hang", 200)  # the first request is held until released
    notifier = notifiers(hook.url(), timeout_s=10.0, max_queue=3, backoff_s=0.01)
    notifier.submit(_alert(0))
    wait_until(lambda: hook.count() == 1, 5, "alert 0 to be in flight")
    assert [notifier.submit(_alert(i)) for i in range(1, 6)] == [True, True, True, False, False]
    assert notifier.counters() == {"delivered": 0, "failed": 0, "dropped": 2, "queued": 4}
    with caplog.at_level(logging.WARNING, logger="trinity.controller.process.webhook"):
        hook.release.set()
        wait_until(settled(notifier, 6), 10, "the queue to drain")
    assert notifier.counters() == {"delivered": 4, "failed": 0, "dropped": 2, "queued": 0}
    assert [b["details"]["n"] for b in hook.bodies()] == [0, 3, 4, 5]
    assert any("dropped 2 oldest" in r.getMessage() for r in caplog.records)


def test_unserialisable_alert_is_dropped_not_raised(serve, notifiers) -> None:
    hook = serve(200)
    notifier = notifiers(hook.url(), **FAST)
    alert = _alert(1)
    alert["details"]["self"] = alert  # a cycle
    assert notifier.submit(alert) is False
    assert notifier.submit(_alert(2)) is True
    wait_until(settled(notifier, 2), 10, "the delivery")
    assert notifier.counters() == {"delivered": 1, "failed": 0, "dropped": 1, "queued": 0}


# -- secrets stay out of logs ---------------------------------------------------------


def test_failure_logs_show_only_the_redacted_url(
        serve, notifiers, refusing_url: str, caplog: pytest.LogCaptureFixture) -> None:
    hook = serve(500)
    secret_url = hook.url("/hook/T0k3nPath?key=K3yQuery", auth="alice:S3cretPw@")
    refused = refusing_url.replace("http://", "http://bob:S3cretPw@") + "/T0k3nPath?key=K3yQuery"
    with caplog.at_level(logging.DEBUG, logger="trinity.controller.process.webhook"):
        for url in (secret_url, refused):
            notifier = notifiers(url, max_attempts=2, **FAST)
            notifier.submit(_alert(1))
            wait_until(settled(notifier, 1), 10, "the failure")
            assert notifier.counters()["failed"] == 1
    text = caplog.text
    assert "gave up" in text
    assert f"http://***@127.0.0.1:{hook.port}/***?***" in text
    for secret in ("alice", "bob", "S3cretPw", "T0k3nPath", "K3yQuery"):
        assert secret not in text
    assert hook.received[0].headers["authorization"].startswith("Basic ")  # userinfo is used


# -- URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("http://example.com", "http://example.com"),
    ("https://hooks.example.com/services/x?y=1", "https://hooks.example.com/services/x?y=1"),
    ("HTTPS://Example.COM:8443/p", "HTTPS://Example.COM:8443/p"),
    ("http://[::1]:8080/hook", "http://[::1]:8080/hook"),
    ("http://user:pw@127.0.0.1:9/x", "http://user:pw@127.0.0.1:9/x"),
    ("  https://example.com/hook\n", "https://example.com/hook"),
])
def test_valid_urls(url: str, expected: str) -> None:
    assert validate_webhook_url(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("", "empty"),
    ("   ", "empty"),
    ("ftp://user:S3cret@example.com/T0ken?k=K3y", "http:// or https://"),
    ("file:///etc/passwd", "absolute"),
    ("javascript:alert(1)", "absolute"),
    ("hooks.example.com/alerts", "absolute"),
    ("//example.com/x", "absolute"),
    ("http://", "absolute"),
    ("http:///path", "absolute"),
    ("http://user:S3cret@:80/x", "no host"),
    ("http://example.com:99999/x?k=K3y", "invalid port"),
    ("http://example.com:abc/", "invalid port"),
    ("http://example.com:0/", "port 0"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com/a\tb", "whitespace"),
    ("http://[::1/x", "not a valid URL"),
])
def test_invalid_urls_raise_config_error_without_secrets(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="TRINITY_ALERT_WEBHOOK") as info:
        validate_webhook_url(url)
    assert message in str(info.value)
    for secret in ("S3cret", "T0ken", "K3y"):
        assert secret not in str(info.value)


def test_non_string_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        validate_webhook_url(None)  # type: ignore[arg-type]


def test_constructor_validates_url_and_settings() -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        WebhookNotifier("ftp://example.com/x")
    for bad in ({"timeout_s": 0}, {"timeout_s": float("inf")}, {"max_attempts": 0},
                {"backoff_s": -1}, {"max_queue": 0}):
        with pytest.raises(ConfigError):
            WebhookNotifier("http://127.0.0.1:9/x", **bad)


@pytest.mark.parametrize(("url", "redacted"), [
    ("https://hooks.example.com", "https://hooks.example.com"),
    ("https://hooks.example.com/", "https://hooks.example.com/"),
    ("https://hooks.slack.com/services/T0/B0/XXXX", "https://hooks.slack.com/***"),
    ("https://user:pw@example.com:8443/a?token=t#frag", "https://***@example.com:8443/***?***"),
    ("http://token@example.com?x=1", "http://***@example.com?***"),
    ("HTTP://Example.com:80", "http://example.com:80"),
    ("http://[::1]:8080/x", "http://[::1]:8080/***"),
    ("ftp://u:p@files.example.com/f", "ftp://***@files.example.com/***"),
    ("not a url with s3cret", "<invalid URL>"),
    ("http://[::1/x", "<invalid URL>"),
    ("http://example.com:99999/", "<invalid URL>"),
    ("", "<invalid URL>"),
])
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
