"""Who watches the controller: a hung controller is restarted through supervisord.

The controller restarts hung agents (``trinity.controller.process.healing``), and supervisord
restarts any program that exits; but a controller that is alive and stuck (SIGSTOPped,
deadlocked, blocked forever in a system call) exits nothing and beats to no one, and
with it stop the events, the heartbeat checks, the snapshots and every alert.

So the controller touches a file, ``<run_dir>/controller.alive``, at most once a second
from its loop, and supervisord's event listener (``trinity crashwatch``, subscribed to
TICK_5) looks at it every 5 s. A controller that supervisord has had RUNNING for longer
than ``controller_deadline_s`` (``TRINITY_CONTROLLER_DEADLINE``, 30 s) and whose file
is older than that is hung if it is stopped, or if its main thread has not woken up
since the previous look (deadlocked, blocked in a system call, spinning): it is
restarted the way a hung agent is (stopProcess, SIGKILL, startProcess), and an
``agent_restarted`` alert naming the controller says so. One whose main thread keeps
waking up is waiting on a lock (SQLite's busy handler) and is left to finish.
The deadline is in real seconds, whatever the time scale: the controller's loop turns
several times a second, its longest legitimate wait is SQLite's 10 s busy timeout.

Restarts are limited as the agents' are (``restart_intensity`` within
``restart_period_s``); past that, one ``restart_intensity_exceeded`` alert and no more
restarts until the controller touches its file again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psutil

from trinity.contract import CONTROLLER, Alert
from trinity.controller.process.healing import ProcessControl, RestartIntensity, main_thread_wakeups
from trinity.controller.supervision.supervisord import SupervisorError
from trinity.settings import Settings

log = logging.getLogger(__name__)

ALIVE_FILE = "controller.alive"
TOUCH_EVERY_S = 1.0


def alive_path(settings: Settings) -> Path:
    return settings.run_dir / ALIVE_FILE


class AliveFile:
    """The controller's side: touch the file, at most once per ``TOUCH_EVERY_S``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next = 0.0

    def touch(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + TOUCH_EVERY_S
        try:
            self.path.touch()
        except OSError as exc:  # the run goes on; the watchdog will see a stale file
            log.error("cannot touch %s: %s", self.path, exc)


class ControllerWatch:
    """The listener's side: restart the controller when its file is stale."""

    def __init__(self, settings: Settings, control: ProcessControl) -> None:
        self.path = alive_path(settings)
        self.deadline_s = settings.controller_deadline_s
        self.control = control
        self.policy = RestartIntensity(settings.restart_intensity, settings.restart_period_s)
        self._wakeups: tuple[int, int] | None = None  # (pid, main-thread wake-ups) last seen

    def _never_wakes(self, pid: int) -> bool:
        """Whether ``pid``'s main thread stayed asleep (or spun without a system call)
        since the previous check: hung. One still waking up is slow, not hung: SQLite's
        busy handler sleeps and wakes many times a second while it waits for a lock,
        and restarting would not end that wait. The first look only counts."""
        wakeups = main_thread_wakeups(pid)
        before, self._wakeups = self._wakeups, (pid, wakeups)
        return (before is not None and before[0] == pid and wakeups >= 0
                and wakeups == before[1])

    def _last_touched(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def check(self) -> Alert | None:
        """Look once; the alert to record when the controller was hung, else None."""
        info = self.control.process(CONTROLLER)
        pid = int(info.get("pid") or 0)
        if info.get("statename") != "RUNNING" or pid <= 0:
            return None  # stopped, or supervisord is (re)starting it
        now = float(info.get("now") or time.time())
        started = float(info.get("start") or 0)
        touched = self._last_touched()
        # A process younger than the deadline is still starting; the file of an earlier
        # controller says nothing about this one.
        quiet = now - max(touched, started)
        if quiet <= self.deadline_s:
            self._wakeups = None
            if touched > started:
                self.policy.rearm(CONTROLLER)
            return None
        try:
            status = str(psutil.Process(pid).status())
        except psutil.Error:
            return None  # gone since supervisord answered: autorestart's business
        if status != psutil.STATUS_STOPPED and not self._never_wakes(pid):
            return None
        mono = time.monotonic()
        if not self.policy.allows(CONTROLLER, mono):
            if CONTROLLER in self.policy.escalated:
                return None
            self.policy.escalate(CONTROLLER)
            return Alert.of(
                "restart_intensity_exceeded", "critical",
                f"controller hung again (its loop silent for {quiet:.1f} s, process {pid} "
                f"{status}) after {self.policy.in_period(CONTROLLER, mono)} restarts within "
                f"{self.policy.period_s:g} s: restart intensity exceeded, not restarting it "
                f"until its loop runs again",
                agent=CONTROLLER, pid=pid, silent_s=round(quiet, 3), process_status=status,
                intensity=self.policy.intensity, period_s=self.policy.period_s)
        self.policy.record(CONTROLLER, mono)
        try:
            new_pid = self.control.restart_hung(CONTROLLER)
        except SupervisorError as exc:
            return Alert.of(
                "agent_restart_failed", "error",
                f"controller hung (its loop silent for {quiet:.1f} s, process {pid} {status})"
                f" and could not be restarted: {exc}",
                agent=CONTROLLER, pid=pid, silent_s=round(quiet, 3), error=str(exc)[:500])
        return Alert.of(
            "agent_restarted", "warning",
            f"controller hung (its loop silent for {quiet:.1f} s, process {pid} {status}): "
            f"restarted through supervisord as pid {new_pid} (restart "
            f"{self.policy.in_period(CONTROLLER, mono)} of at most {self.policy.intensity} "
            f"within {self.policy.period_s:g} s)",
            agent=CONTROLLER, pid=pid, new_pid=new_pid, silent_s=round(quiet, 3),
            process_status=status, reason="its loop silent past the controller deadline")
