"""Injected clocks: every schedule in Trinity runs on one of these.

A ``ScaledClock`` compresses simulated time: at ``time_scale=1440`` one real
second is 24 simulated minutes, so the 24-hour plan runs in one minute with the
same code path. Intervals are measured with ``time.monotonic`` so that wall-clock
jumps never fire or skip a schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Real seconds from an arbitrary origin; only differences mean anything."""

    def sim_elapsed_s(self) -> float:
        """Simulated seconds elapsed since the clock's origin."""


@dataclass
class ScaledClock:
    """Simulated time = offset + (monotonic now - start) * time_scale.

    ``sim_offset_s`` lets a restarted process continue simulated time where the
    previous one stopped instead of counting the downtime.
    """

    time_scale: float = 1.0
    sim_offset_s: float = 0.0
    _start: float = field(default_factory=time.monotonic)

    def monotonic(self) -> float:
        return time.monotonic()

    def sim_elapsed_s(self) -> float:
        return self.sim_offset_s + (time.monotonic() - self._start) * self.time_scale


@dataclass
class ManualClock:
    """A clock tests move by hand."""

    now_s: float = 0.0
    time_scale: float = 1.0

    def monotonic(self) -> float:
        return self.now_s

    def sim_elapsed_s(self) -> float:
        return self.now_s * self.time_scale

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def now_ms() -> int:
    """Real wall-clock time in milliseconds (for records, never for intervals)."""
    return time.time_ns() // 1_000_000
