"""The optional alert webhook (``TRINITY_ALERT_WEBHOOK``): every alert POSTed as JSON.

The controller's loop never waits on the network. :meth:`WebhookNotifier.submit`
serialises the alert and appends it to a bounded in-memory queue, nothing more; a
daemon worker thread does the HTTP. When the queue is full the OLDEST queued alert is
dropped (and counted) so the newest ones reach the webhook. A failing webhook — one
that hangs, answers 5xx, refuses connections, or whose name does not resolve — costs
the worker time and the queue alerts, never the controller.

Delivery: one ``httpx.Client``, ``Content-Type: application/json`` and
``User-Agent: trinity/<version>``; each attempt is bounded by ``timeout_s`` per phase
(connect, write, read) and the response body is read only up to a cap and a deadline.
Connection errors, timeouts, 5xx and 429 are retried with exponential backoff
(``backoff_s * 2**(attempt-1)``; a numeric ``Retry-After`` is honoured up to
``retry_after_cap_s``) until ``max_attempts``; 2xx is delivered; any other status
(4xx, and 3xx: redirects are not followed for a POST) fails at once.

Counters (:meth:`WebhookNotifier.counters`) account for every ``submit`` call exactly
once: ``delivered + failed + dropped + queued == submitted``, where ``queued`` includes
the alert in flight. ``dropped`` counts alerts never sent: pushed out of a full queue,
submitted after :meth:`~WebhookNotifier.close`, not JSON-serialisable, or abandoned
unsent when ``close`` ran out of time.

The URL may carry credentials (userinfo, a token in the query, or in the path as
Slack's and Discord's webhooks do), so it is only ever printed through
:func:`redact_url`, which keeps scheme, host and port.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

import httpx

from trinity.errors import ConfigError
from trinity.urls import redact_url, validate_webhook_url

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
MAX_RESPONSE_BYTES = 64 * 1024
_JOIN_SLACK_S = 0.05


def _user_agent() -> str:
    try:
        return f"trinity/{version('trinity')}"
    except PackageNotFoundError:
        return "trinity/dev"


USER_AGENT = _user_agent()


# -- delivery ---------------------------------------------------------------------


class _Item:
    __slots__ = ("alert_id", "body")

    def __init__(self, alert_id: str, body: bytes) -> None:
        self.alert_id = alert_id
        self.body = body


class _Outcome:
    """One attempt: ``ok``; or not, with ``reason``, ``retry`` and a Retry-After hint."""

    __slots__ = ("ok", "reason", "retry", "retry_after_s")

    def __init__(self, ok: bool, reason: str = "", *, retry: bool = False,
                 retry_after_s: float | None = None) -> None:
        self.ok = ok
        self.reason = reason
        self.retry = retry
        self.retry_after_s = retry_after_s


def _retry_after(value: str | None) -> float | None:
    """A numeric ``Retry-After`` in seconds; None for absent, HTTP-date or nonsense."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class WebhookNotifier:
    """POSTs alerts to a webhook from a daemon thread; :meth:`submit` never blocks.

    ``client`` (tests, custom transports) is used as-is and not closed; every request
    still carries this notifier's timeout and headers. Without it the notifier owns one
    ``httpx.Client`` and closes it when the worker exits.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
        max_queue: int = 1000,
        client: httpx.Client | None = None,
        retry_after_cap_s: float = 5.0,
    ) -> None:
        self.url = validate_webhook_url(url)
        self.redacted_url = redact_url(self.url)
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"webhook timeout must be a positive number of seconds, "
                              f"got {timeout_s!r}")
        if max_attempts < 1:
            raise ConfigError(f"webhook max_attempts must be at least 1, got {max_attempts!r}")
        if not (math.isfinite(backoff_s) and backoff_s >= 0):
            raise ConfigError(f"webhook backoff must be >= 0 seconds, got {backoff_s!r}")
        if max_queue < 1:
            raise ConfigError(f"webhook max_queue must be at least 1, got {max_queue!r}")
        if not (math.isfinite(retry_after_cap_s) and retry_after_cap_s >= 0):
            raise ConfigError(f"webhook retry_after_cap_s must be >= 0, "
                              f"got {retry_after_cap_s!r}")
        self.timeout_s = float(timeout_s)
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        self.max_queue = int(max_queue)
        self.retry_after_cap_s = float(retry_after_cap_s)
        self._timeout = httpx.Timeout(self.timeout_s)
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        self._owns_client = client is None
        if client is None:
            try:
                client = httpx.Client(timeout=self._timeout, headers=self._headers,
                                      follow_redirects=False)
            except Exception as exc:  # e.g. SSL_CERT_FILE pointing nowhere
                raise ConfigError(f"cannot set up the HTTP client for the alert webhook: "
                                  f"{type(exc).__name__}: {exc}") from None
        self._client = client

        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
        self._delivered = 0
        self._failed = 0
        self._dropped = 0
        self._dropped_logged = 0
        self._closing = False
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trinity-alert-webhook",
                                        daemon=True)
        self._thread.start()

    # -- the controller's side (never touches the network) ------------------------

    def submit(self, alert: dict[str, Any]) -> bool:
        """Queue ``alert`` for delivery; never blocks on the network, never raises.

        The alert is serialised now (a snapshot: later changes to the dict are not
        sent). False when the notifier is closed or the alert is not serialisable (it
        is dropped), or when the queue was full and the oldest queued alert was dropped
        to make room (this one is queued); True when it was queued without loss.
        """
        alert_id = "?"
        try:
            alert_id = str(alert.get("alert_id", "?"))
            body = json.dumps(alert, default=str).encode("utf-8")
        except Exception as exc:  # circular references, a broken __str__
            with self._cond:
                self._dropped += 1
            log.warning("alert webhook %s: cannot serialise alert %s: %s: %s",
                        self.redacted_url, alert_id, type(exc).__name__, exc)
            return False
        with self._cond:
            if self._closing:
                self._dropped += 1
                return False
            lost = False
            while len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self._dropped += 1
                lost = True
            self._queue.append(_Item(alert_id, body))
            self._cond.notify()
        return not lost

    def counters(self) -> dict[str, int]:
        """``delivered``, ``failed``, ``dropped`` and ``queued`` (waiting or in flight)."""
        with self._cond:
            return {
                "delivered": self._delivered,
                "failed": self._failed,
                "dropped": self._dropped,
                "queued": len(self._queue) + self._in_flight,
            }

    @property
    def running(self) -> bool:
        """Whether the worker thread is still alive (it may outlive :meth:`close`)."""
        return self._thread.is_alive()

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stop accepting alerts, deliver what can be delivered within ``timeout_s``,
        then abandon the rest (counted as dropped) and return.

        Returns within ``timeout_s`` plus a few milliseconds whatever the server does.
        True when the worker has exited; False when it was still inside a request (it
        stops after that request, whose outcome is still counted, within the HTTP
        timeout). Idempotent.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            with self._cond:
                abandoned = len(self._queue)
                self._dropped += abandoned
                self._queue.clear()
                self._cond.notify_all()
            if abandoned:
                log.warning("alert webhook %s: closed with %d alert(s) undelivered",
                            self.redacted_url, abandoned)
            self._thread.join(_JOIN_SLACK_S)
        return not self._thread.is_alive()

    def __enter__(self) -> WebhookNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker's side --------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if self._abandon.is_set() or not self._queue:
                        return
                    item = self._queue.popleft()
                    self._in_flight = 1
                    newly_dropped = self._dropped - self._dropped_logged
                    self._dropped_logged = self._dropped
                if newly_dropped:
                    log.warning("alert webhook %s: queue full, dropped %d oldest alert(s)",
                                self.redacted_url, newly_dropped)
                result = "failed"
                try:
                    result = self._deliver(item)
                except Exception:  # the worker must survive anything
                    log.exception("alert webhook %s: unexpected error delivering alert %s",
                                  self.redacted_url, item.alert_id)
                finally:
                    with self._cond:
                        self._in_flight = 0
                        if result == "delivered":
                            self._delivered += 1
                        elif result == "dropped":
                            self._dropped += 1
                        else:
                            self._failed += 1
        finally:
            if self._owns_client:
                self._client.close()

    def _deliver(self, item: _Item) -> str:
        """Every attempt for one alert: ``delivered`` once a 2xx is received, ``failed``
        after the last attempt, ``dropped`` if close abandoned it before any attempt."""
        if self._abandon.is_set():  # popped just as close() ran out of time
            return "dropped"
        outcome = _Outcome(False, "not attempted")
        attempts = 0
        for attempt in range(1, self.max_attempts + 1):
            attempts = attempt
            outcome = self._attempt(item)
            if outcome.ok:
                return "delivered"
            if not outcome.retry or attempt == self.max_attempts:
                break
            delay = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            if outcome.retry_after_s is not None:
                delay = max(delay, min(outcome.retry_after_s, self.retry_after_cap_s))
            if self._abandon.wait(delay):
                outcome.reason += " (then closed)"
                break
        log.warning("alert webhook %s: gave up on alert %s after %d attempt(s): %s",
                    self.redacted_url, item.alert_id, attempts, outcome.reason)
        return "failed"

    def _attempt(self, item: _Item) -> _Outcome:
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._client.stream("POST", self.url, content=item.body,
                                     headers=self._headers, timeout=self._timeout) as resp:
                status = resp.status_code
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                self._drain(resp, deadline)
        except httpx.TimeoutException as exc:
            return _Outcome(False, f"timed out ({type(exc).__name__}, "
                                   f"{self.timeout_s:g} s)", retry=True)
        except (httpx.TransportError, OSError) as exc:
            return _Outcome(False, self._describe(exc), retry=True)
        except httpx.HTTPError as exc:  # e.g. an invalid URL after all: not retryable
            return _Outcome(False, self._describe(exc))
        if 200 <= status < 300:
            return _Outcome(True)
        reason = f"HTTP {status}"
        if status >= 500 or status == 429:
            return _Outcome(False, reason, retry=True, retry_after_s=retry_after)
        return _Outcome(False, reason)

    @staticmethod
    def _drain(resp: httpx.Response, deadline: float) -> None:
        """Read a small body within the deadline so the connection can be reused;
        otherwise leave it (closing the stream closes the connection). The status is
        already known, so a failure here does not change the outcome (and a delivered
        alert is not sent twice)."""
        read = 0
        try:
            for chunk in resp.iter_raw():
                read += len(chunk)
                if read > MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                    return
        except (httpx.HTTPError, OSError):
            return

    def _describe(self, exc: BaseException) -> str:
        """``Class: message`` with the URL (and its secrets) scrubbed out."""
        text = f"{type(exc).__name__}: {exc}".replace(self.url, self.redacted_url)
        parts = urlsplit(self.url)
        for secret in (parts.password, parts.username, parts.query, parts.path):
            if secret and secret != "/" and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text
