"""Self-healing: the controller restarts an agent that is hung, not dead.

An agent silent past its heartbeat deadline whose process still exists (stopped,
deadlocked, spinning) is restarted through supervisord's XML-RPC API. A dead one is not:
supervisord's autorestart starts it again and crashwatch records the exit. A process
supervisord has just started is not hung either until it has had the startup grace to
load its models and send a first heartbeat; one asleep in a system call (a database lock
wait, which SQLite ends after its busy timeout) gets that timeout on top of its deadline;
and silence only counts while the controller itself was ticking, since heartbeats it
could not read prove nothing. While the controller waits on a locked journal it restarts
only stopped agents, the likely holders of that lock (``heal_stopped``).

A silent agent whose main thread keeps waking up is not hung but cut off: its loop runs
(polling its socket, sending heartbeats) and the heartbeats do not arrive, as behind a
cut network link. Restarting it would throw away its work and change nothing, so it is
alerted once as ``agent_unreachable`` instead. The main thread's voluntary context
switches (``/proc/<pid>/task/<pid>/status``) tell the two apart: they do not move while
the thread is stopped, deadlocked on a lock or spinning in code that never yields.

Restarts are limited the way an OTP supervisor limits them: at most ``intensity``
restarts of one agent within a sliding ``period_s``. A hang past that is escalated to one
critical alert instead of a restart storm, and that agent is left alone until it sends a
heartbeat again (then restarting resumes, the window still counting the earlier ones).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from trinity.contract import Alert
from trinity.controller.process.heartbeats import AgentHealth, HeartbeatMonitor
from trinity.controller.supervision.supervisord import SupervisorClient, SupervisorError
from trinity.settings import Settings

log = logging.getLogger(__name__)

# How often a silent agent's process is looked at (supervisord is asked each time).
CHECK_EVERY_S = 1.0
# A process asleep in a system call may be waiting for a database lock: SQLite gives up
# after the 10 s busy timeout, and the process beats again within the 1 s back-off that
# follows. So such a process is hung only once silent this much longer than the deadline;
# one stopped or spinning is hung at the deadline.
ASLEEP_ALLOWANCE_S = 12.0
ASLEEP = frozenset({psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP, psutil.STATUS_IDLE})
AWAKE = ASLEEP | {psutil.STATUS_RUNNING}  # not stopped: maybe cut off rather than hung


class ProcessControl(Protocol):
    """What healing needs of supervisord (``SupervisorClient``; a fake in unit tests)."""

    def process(self, name: str) -> dict[str, Any]: ...

    def restart_hung(self, name: str, timeout_s: float = ...) -> int: ...


class RestartIntensity:
    """OTP's restart intensity: at most ``intensity`` restarts per agent within any
    ``period_s``; ``escalated`` agents are not restarted until they beat again."""

    def __init__(self, intensity: int, period_s: float) -> None:
        self.intensity = intensity
        self.period_s = period_s
        self._restarts: dict[str, deque[float]] = {}
        self.escalated: set[str] = set()

    def in_period(self, agent: str, now: float) -> int:
        """Restarts of ``agent`` within the period that ends now."""
        times = self._restarts.setdefault(agent, deque())
        while times and now - times[0] >= self.period_s:
            times.popleft()
        return len(times)

    def allows(self, agent: str, now: float) -> bool:
        return agent not in self.escalated and self.in_period(agent, now) < self.intensity

    def record(self, agent: str, now: float) -> None:
        self._restarts.setdefault(agent, deque()).append(now)

    def escalate(self, agent: str) -> None:
        """Stop restarting ``agent``."""
        self.escalated.add(agent)

    def rearm(self, agent: str) -> None:
        self.escalated.discard(agent)


@dataclass(frozen=True)
class HungProcess:
    pid: int
    status: str     # psutil's: "stopped" for SIGSTOP, "running", "sleeping", ...
    uptime_s: float


class Healer:
    def __init__(self, control: ProcessControl | None, intensity: RestartIntensity,
                 startup_grace_s: float, deadline_s: float, stall_s: float = 1.0) -> None:
        self.control = control
        self.policy = intensity
        self.deadline_s = deadline_s
        # A gap this long between two calls means the controller itself was held up (a
        # locked database, SIGSTOP): heartbeats it could not read are no evidence of a
        # hang, so silence only counts from when it watches again.
        self.stall_s = stall_s
        self._watching_since = 0.0
        self._last_call: float | None = None
        # A process that has not beaten yet is only hung once it had this long.
        self.start_allowance_s = startup_grace_s + deadline_s
        self._next_check: dict[str, float] = {}
        self._beats_when_escalated: dict[str, int] = {}
        # Agents a failed restart may have left stopped: supervisord will not start them.
        self._half_restarted: set[str] = set()
        # agent -> (pid, its main thread's voluntary context switches) at the last check.
        self._wakeups: dict[str, tuple[int, int]] = {}
        self._unreachable: set[str] = set()  # alerted as unreachable in this silence
        if control is None:
            log.warning("self-healing is off: not running under supervisord "
                        "(no SUPERVISOR_SERVER_URL); a hung agent is only alerted")
        elif intensity.intensity == 0:
            log.warning("self-healing is off: TRINITY_RESTART_INTENSITY=0; a hung agent is "
                        "only alerted")

    @classmethod
    def from_settings(cls, settings: Settings) -> Healer:
        return cls(SupervisorClient.from_env(),
                   RestartIntensity(settings.restart_intensity, settings.restart_period_s),
                   settings.startup_grace_s, settings.heartbeat_deadline_s,
                   stall_s=settings.heartbeat_interval_s)

    @property
    def enabled(self) -> bool:
        return self.control is not None and self.policy.intensity > 0

    def heal(self, monitor: HeartbeatMonitor, now: float) -> list[Alert]:
        """Restart the hung agents that may be restarted; the alerts to raise."""
        if self._last_call is None or now - self._last_call > self.stall_s:
            self._watching_since = now
        self._last_call = now
        return self._heal_all(monitor, now, self._watching_since, only_stopped=False)

    def heal_stopped(self, monitor: HeartbeatMonitor, now: float) -> list[Alert]:
        """The controller is held up on the journal's write lock, so it reads no heartbeat
        and silence proves little; but an agent stopped (SIGSTOP) in the middle of a
        transaction holds that lock for as long as it stays stopped. Restart any agent
        whose process is stopped and that has been silent past its deadline."""
        return self._heal_all(monitor, now, float("-inf"), only_stopped=True)

    def _heal_all(self, monitor: HeartbeatMonitor, now: float, watching_since: float, *,
                  only_stopped: bool) -> list[Alert]:
        alerts: list[Alert] = []
        for agent, health in monitor.agents.items():
            if health.beats > self._beats_when_escalated.get(agent, health.beats):
                self.policy.rearm(agent)  # it sent a heartbeat since
                del self._beats_when_escalated[agent]
            if not (health.silent or only_stopped):
                self._wakeups.pop(agent, None)
                self._unreachable.discard(agent)
                continue
            watched = now - max(health.last_seen, watching_since)
            if (not self.enabled or agent in self.policy.escalated or watched <= self.deadline_s
                    or now < self._next_check.get(agent, 0.0)):
                continue
            self._next_check[agent] = now + CHECK_EVERY_S
            alert = self._heal_one(monitor, agent, health, now, watched, only_stopped)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _heal_one(self, monitor: HeartbeatMonitor, agent: str, health: AgentHealth,
                  now: float, watched_s: float, only_stopped: bool) -> Alert | None:
        assert self.control is not None
        try:
            hung = self.hung_process(agent, health.pid)
        except SupervisorError as exc:
            log.error("cannot ask supervisord about silent %s: %s", agent, exc)
            return None
        if hung is None or (only_stopped and hung.status != psutil.STATUS_STOPPED) or (
                hung.status in ASLEEP and watched_s <= self.deadline_s + ASLEEP_ALLOWANCE_S):
            return None
        quiet = now - health.last_seen
        if hung.status in AWAKE and not only_stopped:
            wakeups = main_thread_wakeups(hung.pid)
            before = self._wakeups.get(agent)
            self._wakeups[agent] = (hung.pid, wakeups)
            if before is None or before[0] != hung.pid:
                return None  # one more look, a check later, tells hung from cut off
            if wakeups > before[1]:
                if agent in self._unreachable:
                    return None
                self._unreachable.add(agent)
                return _alert(
                    "agent_unreachable", "warning", agent,
                    f"{agent} sent no heartbeat for {quiet:.1f} s, yet its process {hung.pid} "
                    f"is running its loop ({wakeups - before[1]} wake-ups in the last check):"
                    " its heartbeats do not arrive (a cut link?); not restarting it",
                    silent_s=round(quiet, 3), pid=hung.pid, process_status=hung.status)
        period = self.policy
        if not period.allows(agent, now):
            period.escalate(agent)
            self._beats_when_escalated[agent] = health.beats
            return _alert(
                "restart_intensity_exceeded", "critical", agent,
                f"{agent} hung again (no heartbeat for {quiet:.1f} s, process {hung.pid} "
                f"{hung.status}) after {period.in_period(agent, now)} restarts within "
                f"{period.period_s:g} s: restart intensity exceeded, not restarting it until "
                f"it sends a heartbeat",
                silent_s=round(quiet, 3), pid=hung.pid, process_status=hung.status,
                restarts_in_period=period.in_period(agent, now),
                intensity=period.intensity, period_s=period.period_s)
        period.record(agent, now)
        started = time.monotonic()
        try:
            new_pid = self.control.restart_hung(agent)
        except SupervisorError as exc:
            log.error("%s", exc)
            self._half_restarted.add(agent)
            return _alert("agent_restart_failed", "error", agent,
                          f"{agent} hung (no heartbeat for {quiet:.1f} s, process {hung.pid} "
                          f"{hung.status}) and could not be restarted: {exc}",
                          silent_s=round(quiet, 3), pid=hung.pid, error=str(exc)[:500])
        took = time.monotonic() - started
        self._half_restarted.discard(agent)
        monitor.restarted(agent, now)
        restarts = period.in_period(agent, now)
        return _alert(
            "agent_restarted", "warning", agent,
            f"{agent} hung (no heartbeat for {quiet:.1f} s, process {hung.pid} {hung.status}):"
            f" restarted through supervisord as pid {new_pid} (restart {restarts} of at most "
            f"{period.intensity} within {period.period_s:g} s)",
            silent_s=round(quiet, 3), pid=hung.pid, new_pid=new_pid, process_status=hung.status,
            reason="stopped while the journal was locked" if only_stopped
            else "silent past its heartbeat deadline while its process exists",
            restart_s=round(took, 3), restarts_in_period=restarts,
            intensity=period.intensity, period_s=period.period_s)

    def hung_process(self, agent: str, beat_pid: int | None) -> HungProcess | None:
        """``agent``'s process if it is hung: running for supervisord, not a zombie, and
        either the process that last beat or one past its start allowance. None when it is
        dead, being restarted by supervisord, or still starting."""
        assert self.control is not None
        info = self.control.process(agent)
        pid = int(info.get("pid") or 0)
        if info.get("statename") == "STOPPED" and agent in self._half_restarted:
            return HungProcess(pid, "stopped by a failed restart", 0.0)
        if info.get("statename") != "RUNNING" or pid <= 0:
            return None
        try:
            status = psutil.Process(pid).status()
        except psutil.Error:  # gone since supervisord answered
            return None
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        uptime_s = float(info.get("now", 0)) - float(info.get("start", 0))
        if pid != beat_pid and uptime_s <= self.start_allowance_s:
            return None
        return HungProcess(pid, str(status), uptime_s)


def main_thread_wakeups(pid: int) -> int:
    """Voluntary context switches of ``pid``'s main thread so far (-1 if unreadable)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def _alert(kind: str, severity: str, agent: str, message: str, **details: object) -> Alert:
    return Alert(kind, severity, message, alert_id=uuid.uuid4().hex, agent=agent,
                 details=dict(details))
