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
# Memory growth is measured from the first sample after a process is warm (the caller
# says when: an agent once it has applied its first few messages, so its model is
# loaded and its buffers have grown to their working size): loading is not a leak. In a
# compressed run a model load alone can take simulated hours, so the warm-up is counted
# in work, not in time.


@dataclass
class _Tracked:
    proc: psutil.Process
    warm_sim_s: float | None = None  # when the process was first seen warm
    baseline_mb: float | None = None
    baseline_sim_s: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)  # (sim s, rss MB)


def _round(value: float, digits: int = 1) -> float:
    return round(value, digits)


class MetricsSampler:
    """Samples a changing set of named processes; keeps per-process RSS history so that
    growth per simulated hour can be computed (and alerted on) from measured data."""

    def __init__(self) -> None:
        self._tracked: dict[str, _Tracked] = {}
        psutil.cpu_percent(None)  # the first call only starts the measurement

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
                del tracked.history[:-64]
                if tracked.baseline_mb is None:
                    tracked.baseline_mb, tracked.baseline_sim_s = rss_mb, sim_s
            if io is not None:
                read += io.read_bytes
                write += io.write_bytes
            processes[name] = {
                "pid": proc.pid,
                "rss_mb": _round(rss_mb),
                "uss_mb": _round(mem.uss / MB),
                "pss_mb": _round(getattr(mem, "pss", mem.uss) / MB),
                "cpu_percent": _round(cpu),
                "growth_pct_per_hour": self._growth(tracked, sim_s, rss_mb),
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

    @staticmethod
    def _growth(tracked: _Tracked, sim_s: float, rss_mb: float) -> float | None:
        if tracked.baseline_mb is None or sim_s <= tracked.baseline_sim_s:
            return None
        hours = (sim_s - tracked.baseline_sim_s) / 3600
        return round((rss_mb - tracked.baseline_mb) / tracked.baseline_mb / hours * 100, 3)

    def _total_growth(self, sim_s: float) -> float | None:
        """Growth of the warm processes together: their growth rates weighted by their
        baseline memory (None until one is warm and time has passed since)."""
        weighted = total = 0.0
        for tracked in self._tracked.values():
            rate = self._growth(tracked, sim_s, tracked.history[-1][1]) if tracked.history else None
            if rate is None or tracked.baseline_mb is None:
                continue
            weighted += rate * tracked.baseline_mb
            total += tracked.baseline_mb
        return round(weighted / total, 3) if total else None

    def hourly_growth(self, sim_s: float) -> dict[str, float]:
        """Per process: RSS growth over the last simulated hour, in percent, for processes
        past their warm-up that have a sample about an hour old."""
        found: dict[str, float] = {}
        for name, tracked in self._tracked.items():
            if tracked.baseline_mb is None or not tracked.history:
                continue
            older = [(t, mb) for t, mb in tracked.history
                     if sim_s - t >= 3600 and t >= tracked.baseline_sim_s]
            if not older:
                continue
            then_mb = older[-1][1]
            now_mb = tracked.history[-1][1]
            if then_mb <= 0:
                continue
            found[name] = (now_mb - then_mb) / then_mb * 100
        return found
