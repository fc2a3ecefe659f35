"""A real Firestore emulator for the tests: ``node firestore/serve.mjs`` in a child process.

The emulator is the npm package ``@firestore-emulator/server``, installed by the project's
own ``firestore/package.json`` (``npm ci --prefix firestore``). ``serve.mjs`` binds a free
port on 127.0.0.1 and prints one JSON line with it; :class:`FirestoreEmulator` reads that
line back (it never guesses a free port) and exposes ``host`` for
``FIRESTORE_EMULATOR_HOST``. :func:`need_emulator` skips a test on a developer machine
without Node or the npm install, and fails it in CI (``CI=true``).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRESTORE_DIR = ROOT / "firestore"
SERVE = FIRESTORE_DIR / "serve.mjs"
PACKAGE = FIRESTORE_DIR / "node_modules" / "@firestore-emulator" / "server" / "package.json"

INSTALL_HINT = "run `make install` (or `npm ci --prefix firestore`)"


def missing_reason() -> str | None:
    """Why the emulator cannot run here, or None when Node and the npm install are there."""
    if shutil.which("node") is None:
        return "the Firestore emulator needs Node.js (`node` is not on PATH)"
    if not PACKAGE.is_file():
        return f"the Firestore emulator is not installed in {FIRESTORE_DIR}: {INSTALL_HINT}"
    return None


def need_emulator() -> None:
    """Skip the calling test when the emulator cannot run; in CI (CI=true) fail it instead."""
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing emulator fails the suite)")
    pytest.skip(reason)


class EmulatorError(RuntimeError):
    """The emulator did not start (or printed something other than its ready line)."""


class FirestoreEmulator:
    """One emulator process; ``start()`` returns once it listens, ``stop()`` ends it.

    ``host`` is ``"127.0.0.1:<port>"``, the value for ``FIRESTORE_EMULATOR_HOST``. Each
    process starts empty and keeps its documents in memory only. The child's stdin is a
    pipe held open by this object: if the test process dies, the emulator exits too.
    """

    def __init__(self, port: int = 0, start_timeout_s: float = 15.0) -> None:
        self.port_requested = port
        self.start_timeout_s = start_timeout_s
        self.startup_s: float | None = None
        self._host: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._last_log = ""

    @property
    def host(self) -> str:
        if self._host is None:
            raise EmulatorError("the emulator is not running: call start() first")
        return self._host

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def env(self, project: str = "trinity-test") -> dict[str, str]:
        """The environment variables a client needs to talk to this emulator."""
        return {"FIRESTORE_EMULATOR_HOST": self.host, "GOOGLE_CLOUD_PROJECT": project}

    def start(self) -> FirestoreEmulator:
        if self._proc is not None:
            raise EmulatorError("the emulator is already started")
        reason = missing_reason()
        if reason is not None:
            raise EmulatorError(reason)
        node = shutil.which("node")
        assert node is not None
        # The emulator's own messages (e.g. "Method<...> not implemented.") go to a file,
        # not a pipe nobody drains; its tail is quoted when start-up fails.
        self._log = tempfile.TemporaryFile(prefix="firestore-emulator-")  # noqa: SIM115
        began = time.monotonic()
        self._proc = subprocess.Popen(
            [node, str(SERVE), str(self.port_requested), "--exit-on-stdin-close"],
            cwd=FIRESTORE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        try:
            ready = self._read_ready_line()
            self._host = f"{ready['host']}:{int(ready['port'])}"
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EmulatorError(
                        f"the emulator printed no ready line within {self.start_timeout_s} s"
                        f"{self._log_tail()}"
                    )
                if not selector.select(timeout=left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    code = proc.wait(timeout=5)
                    raise EmulatorError(
                        f"the emulator exited with code {code} before it listened"
                        f"{self._log_tail()}"
                    )
                line += chunk
        try:
            ready = json.loads(line.split(b"\n", 1)[0])
            port = int(ready["port"])
            str(ready["host"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EmulatorError(f"unexpected ready line from the emulator: {line!r}") from exc
        if not 0 < port < 65536:
            raise EmulatorError(f"the emulator reported port {port}")
        return dict(ready)

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")[-limit:].strip()
        return f"; its stderr:\n{text}" if text else ""

    def log(self) -> str:
        """Everything the emulator wrote to stderr (kept after ``stop()``)."""
        if self._log is None:
            return self._last_log
        return self._log_tail(limit=1_000_000).removeprefix("; its stderr:\n")

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code (None if never run)."""
        proc, self._proc, self._host = self._proc, None, None
        if proc is None:
            return None
        code: int | None = proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=timeout_s)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._log is not None:
            self._last_log = self.log()
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> FirestoreEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def trinity_collections(project_id: str) -> dict[str, dict[str, dict[str, Any]]]:
    """What the emulator holds of a pattern store in ``project_id`` (FIRESTORE_EMULATOR_HOST
    set): each ``trinity_*`` collection, its documents by id."""
    from google.cloud import firestore

    client = firestore.Client(project=project_id)
    try:
        return {name: {d.id: d.to_dict() for d in client.collection(f"trinity_{name}").stream()}
                for name in ("sessions", "exemplars", "detections", "patterns")}
    finally:
        client.close()
