"""Fixtures shared by the controller tests: webhook receivers, and real processes
under a fake supervisord for the restart policies (healing, the controller watchdog)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import wait_for
from tests.controller.process.test_webhook import Hook
from trinity.controller.supervision.supervisord import SupervisorError


@pytest.fixture
def serve() -> Iterator[Callable[..., Hook]]:
    """Start local webhook receivers (``Hook``); every one is stopped after the test."""
    hooks: list[Hook] = []

    def start(*script: int | str, **kwargs: Any) -> Hook:
        hook = Hook(*script, **kwargs)
        hooks.append(hook)
        return hook

    yield start
    for hook in hooks:
        hook.stop()


class Processes:
    """Real processes standing in for agents; every one is killed after the test."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "120"])
        self.started.append(proc)
        return proc

    def asleep(self) -> int:
        """A process asleep in a system call (``sleep``, as in a lock wait), once it is:
        just spawned, it is still running (exec, loading) and its wake-ups still move."""
        proc = self.spawn()
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_SLEEPING, 5,
                 "the process to sleep")
        return proc.pid

    def hung(self) -> int:
        proc = self.spawn()
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 5,
                 "the process to stop")
        return proc.pid

    def zombie(self) -> int:
        proc = subprocess.Popen(["true"])
        self.started.append(proc)
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 5,
                 "the child to exit unreaped")
        return proc.pid

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.stop_all()


class FakeSupervisord:
    """getProcessInfo answers from ``info``; a restart starts a fresh (running) process."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.info: dict[str, dict[str, Any]] = {}
        self.restarted: list[tuple[str, int]] = []
        self.failure: str | None = None
        self.unreachable = False
        self.asked: Counter[str] = Counter()

    def set(self, name: str, pid: int, statename: str = "RUNNING", uptime_s: float = 3600.0,
            ) -> None:
        now = int(time.time())
        self.info[name] = {"name": name, "pid": pid, "statename": statename,
                           "start": now - int(uptime_s), "now": now}

    def process(self, name: str) -> dict[str, Any]:
        self.asked[name] += 1
        if self.unreachable:
            raise SupervisorError("cannot ask supervisord about it: connection refused")
        # A program no test set is one supervisord has stopped: never hung.
        return dict(self.info.get(name, {"name": name, "pid": 0, "statename": "STOPPED"}))

    def restart_hung(self, name: str, timeout_s: float = 5.0) -> int:
        if self.failure is not None:  # after the kill, as a start that failed would
            self.set(name, 0, statename="STOPPED")
            raise SupervisorError(self.failure)
        old = self.info[name]["pid"]
        if old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGKILL)
        new = self.processes.spawn().pid
        self.restarted.append((name, old))
        self.set(name, new, uptime_s=0)
        return new
