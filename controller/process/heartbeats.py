"""Heartbeat monitor: ``last_seen[name]`` and a deadline of interval × max missed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AgentHealth:
    last_seen: float
    pid: int | None = None
    silent: bool = False
    beats: int = 0
    last_payload: dict[str, Any] = field(default_factory=dict)
    # Restarted by the controller, no heartbeat from the new process yet.
    restarting: bool = False

    @property
    def responsive(self) -> bool:
        return self.beats > 0 and not self.silent and not self.restarting


def heartbeat_pid(payload: dict[str, Any]) -> int | None:
    """The heartbeat's pid if it can be a process id (SQLite, psutil take no other)."""
    pid = payload.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31:
        return pid
    return None


class HeartbeatMonitor:
    def __init__(self, agents: tuple[str, ...], deadline_s: float, now: float,
                 startup_grace_s: float = 0.0) -> None:
        self.deadline_s = deadline_s
        self.startup_grace_s = startup_grace_s
        # An agent that never beat gets the startup grace on top of one deadline: starting
        # all processes at once on a small machine (and loading models) takes a while.
        self.agents = {name: AgentHealth(last_seen=now + startup_grace_s) for name in agents}

    def beat(self, name: str, payload: dict[str, Any], now: float) -> bool:
        """Record a heartbeat; True if the agent had been silent (it recovered)."""
        health = self.agents.get(name)
        if health is None:
            return False
        recovered = health.silent or health.restarting
        health.last_seen = now
        health.silent = health.restarting = False
        health.beats += 1
        health.pid = heartbeat_pid(payload) or health.pid
        health.last_payload = payload
        return recovered

    def restarted(self, name: str, now: float) -> None:
        """``name`` was just restarted: its new process gets the startup grace before it
        can be silent again, and its first heartbeat is a recovery."""
        health = self.agents[name]
        health.last_seen = now + self.startup_grace_s
        health.silent = False
        health.restarting = True

    def newly_silent(self, now: float) -> list[tuple[str, float]]:
        """Agents past their deadline that were not yet reported, with their silence in s."""
        found = []
        for name, health in self.agents.items():
            quiet = now - health.last_seen
            if not health.silent and quiet > self.deadline_s:
                health.silent = True
                found.append((name, quiet))
        return found

    def ages(self, now: float) -> dict[str, float | None]:
        """Seconds since each agent's last heartbeat (None before its first)."""
        return {name: (now - h.last_seen) if h.beats else None for name, h in self.agents.items()}
