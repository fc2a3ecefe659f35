"""The base of every Trinity process: initialize / loop / shutdown, a clock injected.

``run()`` installs SIGTERM/SIGINT handlers that only set a flag; each loop turn is short
(the bus's processes poll their socket with a timeout), so a stop request is honoured
within a turn and the process exits 0 after ``shutdown()``. A store that cannot be
opened at start, or fails while running, never ends the process: it says why (with
what an operator can do about it, :func:`store_advice`), waits and tries again, while
it keeps sending heartbeats. Slow calls (a model call) run on one call thread, so the
loop keeps beating meanwhile (:meth:`BaseProcess.wait_for`).

The bus's processes add their sockets and journal on top: ``trinity.bus.process``.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, TypeVar

from trinity.clock import Clock, ScaledClock, now_ms
from trinity.errors import JournalError, ModelTimeout
from trinity.memory import release_free_memory
from trinity.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
# How long past its own timeout a call may take before the wait gives up on it.
_CALL_GRACE_S = 5.0
# After a database error: pause this long (still beating) before the next loop turn.
DB_ERROR_BACKOFF_S = 1.0
# A store that cannot be opened at start: try again this often; say so this often.
STARTUP_RETRY_S = 2.0
STARTUP_REPEAT_S = 60.0
# What an operator does about a store file that cannot be opened (not a database,
# truncated): Trinity never moves one away by itself, since each holds what nothing
# else has (the run's queued messages, what WITNESS learned, what the calls cost).
STORE_ADVICE = {
    "trinity_messages.db": "restore it from a backup, or move it away to start an empty "
                           "journal (giving up the run's queued messages and records)",
    "trinity_patterns.db": "restore it from a backup, or move it away to start an empty "
                           "pattern store (giving up what WITNESS learned, unless the "
                           "Firestore backend holds it)",
    "trinity_costs.db": "restore it from a backup, or move it away to start an empty cost "
                        "ledger (giving up the recorded costs)",
}


def store_advice(database: str, error: str) -> str | None:
    """What to do about ``error`` on the store file named ``database``, if anything."""
    text = error.lower()
    if "not a database" in text or "malformed" in text:
        return STORE_ADVICE.get(database)
    if "disk is full" in text or "no space left" in text:
        return "free space on its file system; the writes are retried until they succeed"
    if "locked" in text:
        return "another connection holds its write lock; the writes are retried until it lets go"
    return None


def store_named(text: str, settings: Settings) -> Path | None:
    """The store whose file name ``text`` (an error message) mentions."""
    for path in (settings.costs_db, settings.patterns_db, settings.messages_db):
        if path.name in text:
            return path
    return None


def store_opened_by(exc: BaseException, settings: Settings) -> Path | None:
    """The store the code that raised ``exc`` was working on: the innermost frame of its
    traceback whose object (a Journal, CostLedger, PatternStore) has the store's path.
    sqlite3's own errors ("database is locked") name no file."""
    stores = {settings.messages_db, settings.patterns_db, settings.costs_db}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        path = getattr(tb.tb_frame.f_locals.get("self"), "path", None)
        if isinstance(path, Path) and path in stores:
            found = path
        tb = tb.tb_next
    return found


def unreadable_store(settings: Settings) -> Path | None:
    """The first store file that exists but cannot be read as a database."""
    for path in (settings.messages_db, settings.patterns_db, settings.costs_db):
        if not path.exists():
            continue
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return path
    return None


class _Call:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _CallThread:
    """One daemon thread that runs calls in turn (a daemon: a call stuck in C code must
    not keep the process from exiting)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> _Call:
        call = _Call(fn)
        self._calls.put(call)
        return call

    def abandon(self) -> None:
        """No more calls: the thread ends once its current one returns."""
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call.value = call.fn()
            except BaseException as exc:  # handed to the waiting thread
                call.error = exc
            finally:
                call.done.set()



class BaseProcess:
    name: ClassVar[str] = "process"
    sends_heartbeats: ClassVar[bool] = True

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or ScaledClock(settings.time_scale)
        self.stopping = False
        self._next_heartbeat = 0.0
        self.database_error: dict[str, Any] | None = None
        self._calls: _CallThread | None = None

    # -- what subclasses fill in ----------------------------------------

    def initialize(self) -> None:
        """Open what the process works with (raise sqlite3.Error or JournalError if a
        store cannot be opened: the start is tried again)."""

    def loop(self) -> None:
        """One turn of the process's work; returns within a poll interval."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Close what ``initialize`` opened."""
        if self._calls is not None:
            self._calls.abandon()

    def send_heartbeat(self) -> None:
        """Send one heartbeat (``beat`` calls this when one is due)."""

    def release_failed_start(self) -> None:
        """Close what a failed ``initialize`` had opened, so the next attempt starts afresh."""

    def on_database_error(self, exc: BaseException) -> None:
        """Hook: the controller raises an alert; agents report it in their heartbeat."""

    # -- the loop's plumbing ------------------------------------------------

    def beat(self) -> None:
        """Send a heartbeat if one is due."""
        now = self.clock.monotonic()
        if self.sends_heartbeats and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval_s
            self.send_heartbeat()

    def wait_for(
        self, fn: Callable[[], T], timeout_s: float, cancel: threading.Event
    ) -> T:
        """Run ``fn`` in the call thread and keep beating while it runs.

        ``fn`` is expected to honour its own timeout; past ``timeout_s`` plus a grace
        the cancel flag is set and the wait gives up with ModelTimeout (the thread is
        left to finish on its own, and the next call gets a new one). A stop request
        also cancels the call. One thread serves every call: starting a thread per
        call cost ~0.25 ms, more than a quick provider's whole answer.
        """
        if self._calls is None:
            self._calls = _CallThread(f"{self.name}-call")
        call = self._calls.submit(fn)
        give_up = time.monotonic() + timeout_s + _CALL_GRACE_S
        while not call.done.wait(min(self.settings.heartbeat_interval_s / 2, 0.25)):
            self.beat()
            if self.stopping:
                cancel.set()
            if time.monotonic() > give_up:
                cancel.set()
                self._calls.abandon()
                self._calls = None
                raise ModelTimeout(f"{self.name}: call still running after {timeout_s:g} s")
        if call.error is not None:
            raise call.error
        return call.value  # type: ignore[no-any-return]

    def tick_during_call(self, cancel: threading.Event) -> None:
        """What a call waiting on this thread does between its polls (a cooperative
        provider's ``tick``): beat when a heartbeat is due, and cancel the call when
        the process is asked to stop."""
        self.beat()
        if self.stopping:
            cancel.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        if not self._start():
            log.info("%s stopped before it could start", self.name)
            return 0
        # Start-up (imports, loading a model or an index) leaves freed heap behind.
        release_free_memory()
        log.info("%s started", self.name, extra={"pid": os.getpid()})
        try:
            while not self.stopping:
                try:
                    self.loop()
                    self.database_error = None
                except (JournalError, sqlite3.Error) as exc:
                    self._database_failed(exc)
        finally:
            self.shutdown()
        log.info("%s stopped cleanly", self.name)
        return 0

    def _start(self) -> bool:
        """``initialize()``, tried again every STARTUP_RETRY_S while a store cannot be
        opened (corrupt, truncated, locked, on a full disk): exiting would only run into
        supervisord's restart limit, while waiting lets the process go on by itself once
        the file is restored or moved away. It says why in one line, once a minute, and,
        if it can already send them, in its heartbeat. False if stopped while waiting."""
        said_at: float | None = None
        while not self.stopping:
            try:
                self.initialize()
            except (JournalError, sqlite3.Error) as exc:
                store = (store_named(str(exc), self.settings)
                         or store_opened_by(exc, self.settings)
                         or unreadable_store(self.settings) or self.settings.messages_db)
                advice = store_advice(store.name, str(exc)) or "it is retried"
                now = time.monotonic()
                if said_at is None or now - said_at >= STARTUP_REPEAT_S:
                    said_at = now
                    what = str(exc) if str(store) in str(exc) else f"{store}: {exc}"
                    log.error("%s cannot start: %s; %s; trying again every %g s",
                              self.name, what, advice, STARTUP_RETRY_S)
                self.database_error = {
                    "error": str(exc)[:500], "error_type": type(exc).__name__,
                    "database": store.name, "doing": f"{self.name} was starting",
                    "ts_ms": now_ms()}
                self._wait_to_start()
                continue
            if said_at is not None:
                log.info("%s: its stores open now", self.name)
                self.database_error = None
            return True
        return False

    def _wait_to_start(self) -> None:
        """Between start attempts: heartbeats (with the error) if they can be sent, then
        close what the failed attempt opened."""
        self._next_heartbeat = 0.0
        deadline = time.monotonic() + STARTUP_RETRY_S
        while time.monotonic() < deadline and not self.stopping:
            try:
                self.beat()
            except (JournalError, sqlite3.Error) as exc:
                log.debug("cannot send a heartbeat: %s", exc)
            time.sleep(0.1)
        self.release_failed_start()

    def _database_failed(self, exc: BaseException) -> None:
        """A locked, full or corrupt database must not end the process: what failed was
        rolled back, so report it, wait a little and go on (it is retried). The traceback
        is logged when the error changes, not once a second while it lasts."""
        repeated = (self.database_error is not None
                    and self.database_error["error"] == str(exc)[:500])
        log.error("database error: %s", exc, exc_info=None if repeated else exc)
        store = store_named(str(exc), self.settings) or store_opened_by(exc, self.settings)
        self.database_error = {"error": str(exc)[:500], "error_type": type(exc).__name__,
                               "ts_ms": now_ms(),
                               **({"database": store.name} if store is not None else {})}
        self._next_heartbeat = 0.0  # the next heartbeat carries the error now
        try:
            self.on_database_error(exc)
        except (JournalError, sqlite3.Error) as again:
            log.error("could not report the database error: %s", again)
        deadline = time.monotonic() + DB_ERROR_BACKOFF_S
        while time.monotonic() < deadline and not self.stopping:
            try:
                self.beat()
            except (JournalError, sqlite3.Error) as again:
                log.error("cannot send a heartbeat: %s", again)
            time.sleep(0.1)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
