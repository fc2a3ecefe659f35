"""System metrics with psutil: CPU, memory of each Trinity process and in total, disk I/O,
queue backlogs and database sizes, in the shape of the plan's ``system_metrics_*.json``.

Memory per process is reported three ways. RSS is what the plan's 500 MB per-process
limit is checked against. The total is the sum of PSS: the GGUF model is memory-mapped
by every process that loads it, so summing RSS would count its pages once per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024
# Warm samples kept per process: a day of 5-minute samples and then some.
HISTORY_SAMPLES = 2000
FLOOR_SAMPLES = 3
# Memory growth compares windows of one simulated hour, but never shorter than this much
# real time: memory changes with the work done in real time. In a compressed run one
# simulated hour is about a second, less than one model call, whose scratch memory
# (~30 MB, returned after the call) would otherwise read as a leak of 10 %/h or more.
MIN_WINDOW_REAL_S = 10.0
# Memory growth is measured from the first sample after a process is warm (the caller
# says when: an agent once it has applied its first few messages, so its model is
# loaded and its buffers have grown to their working size): loading is not a leak. In a
# compressed run a model load alone can take simulated hours, so the warm-up is counted
# in work, not in time.


@dataclass
class _Tracked:
    proc: psutil.Process
    warm_sim_s: float | None = None  # when the process was first seen warm
    history: list[tuple[float, float]] = field(default_factory=list)  # (sim s, rss MB), warm

    def floor(self, start_s: float, end_s: float, min_samples: int = 1) -> float | None:
        """Lowest RSS sampled in (start_s, end_s] (None with fewer than min_samples)."""
        values = [mb for t, mb in self.history if start_s < t <= end_s]
        return min(values) if len(values) >= min_samples else None


def _round(value: float, digits: int = 1) -> float:
    return round(value, digits)


class MetricsSampler:
    """Samples a changing set of named processes; keeps per-process RSS history so that
    growth per simulated hour can be computed (and alerted on) from measured data."""

    def __init__(self, time_scale: float = 1.0) -> None:
        self._tracked: dict[str, _Tracked] = {}
        self.set_time_scale(time_scale)
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def set_time_scale(self, time_scale: float) -> None:
        """Simulated seconds per real second; sets the growth window (simulated s)."""
        self.window_s = max(3600.0, MIN_WINDOW_REAL_S * time_scale)

    def _track(self, pids: dict[str, int], sim_s: float) -> None:
        for name, pid in pids.items():
            known = self._tracked.get(name)
            if known is not None and known.proc.pid == pid:
                continue
            try:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)
            except psutil.Error:
                self._tracked.pop(name, None)
                continue
            # A new pid is a new process (a restart): its history starts over.
            self._tracked[name] = _Tracked(proc)
        for name in set(self._tracked) - set(pids):
            del self._tracked[name]

    def sample(
        self, pids: dict[str, int], sim_s: float, *, queues: dict[str, int],
        databases: dict[str, Path], warm: set[str] | None = None,
    ) -> dict[str, Any]:
        """One measurement of every process in ``pids`` (name -> pid); ``warm`` names the
        processes past their first piece of work (default: all)."""
        self._track(pids, sim_s)
        processes: dict[str, dict[str, Any]] = {}
        read = write = 0
        for name, tracked in list(self._tracked.items()):
            proc = tracked.proc
            try:
                with proc.oneshot():
                    mem = proc.memory_full_info()
                    cpu = proc.cpu_percent(None)
                    io = proc.io_counters() if hasattr(proc, "io_counters") else None
            except psutil.Error:
                del self._tracked[name]
                continue
            rss_mb = mem.rss / MB
            if tracked.warm_sim_s is None and (warm is None or name in warm):
                tracked.warm_sim_s = sim_s
            if tracked.warm_sim_s is not None:
                tracked.history.append((sim_s, rss_mb))
                del tracked.history[1:-HISTORY_SAMPLES]  # the first hour's samples stay
            if io is not None:
                read += io.read_bytes
                write += io.write_bytes
            processes[name] = {
                "pid": proc.pid,
                "rss_mb": _round(rss_mb),
                "uss_mb": _round(mem.uss / MB),
                "pss_mb": _round(getattr(mem, "pss", mem.uss) / MB),
                "cpu_percent": _round(cpu),
                "growth_pct_per_hour": self._growth(tracked, sim_s),
            }
        total_pss = sum(p["pss_mb"] for p in processes.values())
        sizes = {}
        for label, path in databases.items():
            size = 0
            for suffix in ("", "-wal", "-shm"):
                try:
                    size += os.stat(f"{path}{suffix}").st_size
                except OSError:
                    continue
            sizes[label] = _round(size / MB, 3)
        return {
            "cpu_percent": _round(psutil.cpu_percent(None)),
            "memory_mb": _round(total_pss),
            "memory_rss_total_mb": _round(sum(p["rss_mb"] for p in processes.values())),
            "memory_max_process_rss_mb": max((p["rss_mb"] for p in processes.values()),
                                             default=0.0),
            "memory_growth_pct_per_hour": self._total_growth(sim_s),
            "disk_read_mb": _round(read / MB, 3),
            "disk_write_mb": _round(write / MB, 3),
            "queues": queues,
            "processes": processes,
            "databases_mb": sizes,
        }

    def _growth(self, tracked: _Tracked, sim_s: float) -> float | None:
        """Growth per simulated hour from the lowest RSS of the first warm window to the
        lowest of the last one. Floors, because a model call's scratch memory comes and
        goes while a leak raises the floor too. The windows are as long as the leak rule's
        when the process has lived two of them, else half its warm life (at least an
        hour): a compressed run restarted at hour 12 still reports its growth. None before
        two warm hours."""
        warm = tracked.warm_sim_s
        if warm is None or sim_s - warm < 7200:
            return None
        window = max(3600.0, min(self.window_s, (sim_s - warm) / 2))
        first = tracked.floor(warm - 1, warm + window)
        last = tracked.floor(sim_s - window, sim_s)
        if not first or last is None:
            return None
        return round((last - first) / first / ((sim_s - warm - window) / 3600) * 100, 3)

    def _total_growth(self, sim_s: float) -> float | None:
        """Growth of the warm processes together: their rates weighted by their memory."""
        weighted = total = 0.0
        for tracked in self._tracked.values():
            rate = self._growth(tracked, sim_s)
            if rate is None or not tracked.history:
                continue
            weighted += rate * tracked.history[0][1]
            total += tracked.history[0][1]
        return round(weighted / total, 3) if total else None

    def hourly_growth(self, sim_s: float) -> dict[str, float]:
        """Per warm process: the lowest RSS of the last window against the lowest of the
        window before, in percent per simulated hour (what the memory-leak rule reads);
        each window needs a few samples, so one sample caught inside a model call decides
        nothing. The window is one simulated hour unless the run is compressed so far
        that an hour is shorter than ``MIN_WINDOW_REAL_S``."""
        found: dict[str, float] = {}
        window = self.window_s
        for name, tracked in self._tracked.items():
            if tracked.warm_sim_s is None or sim_s - tracked.warm_sim_s < 2 * window:
                continue
            last = tracked.floor(sim_s - window, sim_s, FLOOR_SAMPLES)
            before = tracked.floor(sim_s - 2 * window, sim_s - window, FLOOR_SAMPLES)
            if last is not None and before:
                found[name] = (last - before) / before * 100 / (window / 3600)
        return found
