"""The memory rules on measured memory, and the controller's reading of a pattern store
WITNESS has not finished creating.

* memory_leak / memory_limit: child processes that allocate memory on command, measured
  by the controller's psutil sampler at chosen simulated times.
* database_error: an in-process controller ticking over a pattern store that has its file
  but no tables yet (no fault), then over bytes that are not a database (a fault).

The other anomaly rules, each triggered by creating its condition in a supervised run,
are tests/system/test_alert_rules.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from trinity.controller.process.metrics import MB, MIN_WINDOW_REAL_S, MetricsSampler
from trinity.controller.process.rules import MEMORY_GROWTH_PCT_PER_HOUR, MEMORY_LIMIT_MB, Rules

# -- memory_leak and memory_limit -----------------------------------------------------------

_ALLOCATOR = r"""
import sys
held = []
for line in sys.stdin:
    mb = int(line)
    if mb:
        held.append(bytearray(b"\x01") * (mb << 20))  # written, so resident
    else:
        held.clear()
    sys.stdout.write("ok\n")
    sys.stdout.flush()
"""


class Allocator:
    """A child python process that allocates (and touches) N MB when told to."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _ALLOCATOR], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.allocate(1)  # started and answering

    @property
    def pid(self) -> int:
        return self.proc.pid

    def allocate(self, mb: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{mb}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def free(self) -> None:
        self.allocate(0)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss / MB)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def allocators() -> Iterator[list[Allocator]]:
    made: list[Allocator] = []
    yield made
    for child in made:
        child.close()


def _sample(sampler: MetricsSampler, pids: dict[str, int], sim: float) -> dict[str, float]:
    sample = sampler.sample(pids, sim, queues={}, databases={})
    return {name: p["rss_mb"] for name, p in sample["processes"].items()}


def test_memory_leak_is_measured_growth_per_simulated_hour(
        allocators: list[Allocator]) -> None:
    leaky, flat = Allocator(), Allocator()
    allocators += [leaky, flat]
    pids = {"leaky": leaky.pid, "flat": flat.pid}
    sampler, rules = MetricsSampler(), Rules("run-mem")

    def evaluate(sim: float) -> tuple[dict[str, float], dict[str, float], list[Any]]:
        rss = _sample(sampler, pids, sim)
        growth = sampler.hourly_growth(sim)
        return rss, growth, rules.memory(rss, growth, sim)

    def run(start: float, end: float) -> tuple[dict[str, float], dict[str, float], list[Any]]:
        """Samples every 10 simulated minutes in [start, end]; the alerts raised on the way."""
        raised: list[Any] = []
        sim = start
        while sim <= end:
            rss, growth, found = evaluate(sim)
            raised += found
            sim += 600.0
        return rss, growth, raised

    # Flat for two simulated hours: no growth, no alert.
    rss_base, growth, found = run(0.0, 7200.0)
    assert found == [] and set(growth) == {"leaky", "flat"}
    assert all(abs(g) < MEMORY_GROWTH_PCT_PER_HOUR for g in growth.values())
    leak_mb = 40
    leaky.allocate(leak_mb)
    # Once a whole hour's samples sit above the hour before: one alert.
    rss, growth, found = run(7800.0, 10_800.0)
    expected = leak_mb / rss_base["leaky"] * 100
    # Measured: the allocation shows as RSS growth (within 2 MB of interpreter noise).
    assert rss["leaky"] - rss_base["leaky"] == pytest.approx(leak_mb, abs=2.0)
    assert growth["leaky"] == pytest.approx(expected, abs=2.0 / rss_base["leaky"] * 100)
    assert growth["leaky"] > MEMORY_GROWTH_PCT_PER_HOUR
    assert abs(growth["flat"]) < MEMORY_GROWTH_PCT_PER_HOUR / 4
    (alert,) = found
    assert (alert.kind, alert.severity, alert.agent) == ("memory_leak", "warning", "leaky")
    assert alert.alert_id == "memory_growth/run-mem/leaky/h003"
    assert alert.details["limit_pct"] == MEMORY_GROWTH_PCT_PER_HOUR
    assert alert.details["growth_pct_per_hour"] > MEMORY_GROWTH_PCT_PER_HOUR

    # An hour without growth clears it; a new leak is a new alert.
    _, growth, found = run(11_400.0, 15_000.0)
    assert abs(growth["leaky"]) < MEMORY_GROWTH_PCT_PER_HOUR and found == []
    leaky.allocate(leak_mb)
    _, growth, found = run(15_600.0, 18_600.0)
    assert [(a.kind, a.agent, a.alert_id) for a in found] == [
        ("memory_leak", "leaky", "memory_growth/run-mem/leaky/h005")]
    assert not any(a.agent == "flat" for a in found)


def test_a_compressed_run_judges_growth_over_real_seconds_not_a_call_long_hour(
        allocators: list[Allocator]) -> None:
    """At 2880x one simulated hour is 1.25 real seconds, shorter than one model call: a
    call's scratch memory held through a whole simulated hour is not a leak, while memory
    that stays is one, per simulated hour over windows of MIN_WINDOW_REAL_S."""
    agent = Allocator()
    allocators.append(agent)
    agent.allocate(200)  # a working set the size of a model agent's
    pids = {"agent": agent.pid}
    hourly, compressed = MetricsSampler(), MetricsSampler(time_scale=2880)
    assert compressed.window_s == MIN_WINDOW_REAL_S * 2880 > hourly.window_s == 3600
    hourly_alerts, compressed_rules = Rules("run-h"), Rules("run-c")

    def run(start_h: int, end_h: int, busy_h: set[int] = frozenset()) -> tuple[list, list]:
        found_h: list[Any] = []
        found_c: list[Any] = []
        for step in range(start_h * 12, end_h * 12):
            sim = step * 300.0
            busy = step // 12 in busy_h
            if busy and step % 12 == 0:
                agent.allocate(30)  # a model call's scratch, held for the whole hour
            for sampler, rules, found in ((hourly, hourly_alerts, found_h),
                                          (compressed, compressed_rules, found_c)):
                rss = _sample(sampler, pids, sim)
                found += rules.memory(rss, sampler.hourly_growth(sim), sim)
            if busy and step % 12 == 11:
                agent.free()
                agent.allocate(200)
        return found_h, found_c

    # Calls spanning simulated hours 9 and 17: read per hour, they look like a 15 % leak.
    found_h, found_c = run(0, 24, busy_h={9, 17})
    assert [a.kind for a in found_h] == ["memory_leak", "memory_leak"]
    assert found_c == []
    # Memory that stays (+100 % in 8 simulated hours, 12.5 %/h) is a leak at any scale.
    agent.allocate(200)
    found_h, found_c = run(24, 40)
    assert [(a.kind, a.agent) for a in found_c] == [("memory_leak", "agent")]
    assert found_c[0].details["growth_pct_per_hour"] == pytest.approx(100 / 8, abs=1.5)


def test_memory_limit_is_measured_rss_of_one_process(allocators: list[Allocator]) -> None:
    hog, small = Allocator(), Allocator()
    allocators += [hog, small]
    pids = {"hog": hog.pid, "small": small.pid}
    sampler, rules = MetricsSampler(), Rules("run-rss")
    assert rules.memory(_sample(sampler, pids, 0.0), {}, 0.0) == []
    hog.allocate(int(MEMORY_LIMIT_MB) + 20)
    rss = _sample(sampler, pids, 300.0)
    assert rss["hog"] == pytest.approx(hog.rss_mb(), abs=1.0)
    assert rss["hog"] > MEMORY_LIMIT_MB > rss["small"]
    (alert,) = rules.memory(rss, {}, 300.0)
    assert (alert.kind, alert.severity, alert.agent) == ("memory_limit", "error", "hog")
    assert alert.details == {"rss_mb": rss["hog"], "limit_mb": MEMORY_LIMIT_MB}
    assert alert.alert_id == "memory_limit/run-rss/hog/h000"
    # Over the limit for a while: one alert. Freed: cleared, and nothing raised.
    assert rules.memory(_sample(sampler, pids, 600.0), {}, 600.0) == []
    hog.free()
    rss = _sample(sampler, pids, 900.0)
    assert rss["hog"] < MEMORY_LIMIT_MB
    assert rules.memory(rss, {}, 900.0) == []


# -- database_error ----------------------------------------------------------------------


def test_a_pattern_store_without_its_tables_yet_is_no_database_error(short_dir: Path) -> None:
    """WITNESS creates the store's file a moment before its tables: a controller tick in
    between reads an empty store, not a fault. Bytes that are not a database still are."""
    from trinity.bus.journal import Journal
    from trinity.clock import ManualClock
    from trinity.contract import ALERTS
    from trinity.controller.process.controller import Controller
    from trinity.settings import Settings
    from trinity.stores import runs

    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_METRICS_PORT": "0"})
    journal = Journal(settings.messages_db, source="test")
    # 100,000x: a metrics sample (every 300 simulated s) is due every 3 real ms
    runs.create_run(journal.conn, {"time_scale": 1e5, "duration_h": 24.0,
                                   "event_interval_min": 30.0, "budget_usd": 2.0})
    bare = sqlite3.connect(settings.patterns_db)
    bare.execute("PRAGMA journal_mode=WAL")  # the file exists, no table yet
    bare.close()
    controller = Controller(settings, clock=ManualClock())
    controller.initialize()

    def database_errors() -> list[dict[str, Any]]:
        alerts = [json.loads(m.payload) for m in journal.read_after(ALERTS, 0, 10_000)]
        return [a for a in alerts if a["kind"] == "database_error"]

    try:
        for _ in range(3):  # the hour-0 pattern snapshot, then samples and their rules
            time.sleep(0.01)
            controller.tick()
        assert controller.driver is not None and controller.driver.next_snapshot["metrics"] > 1
        assert database_errors() == []
        settings.patterns_db.write_bytes(b"not a database" * 512)
        for suffix in ("-wal", "-shm"):
            Path(f"{settings.patterns_db}{suffix}").unlink(missing_ok=True)
        time.sleep(0.01)
        controller.tick()
        assert [a["details"]["database"] for a in database_errors()] == ["trinity_patterns.db"]
    finally:
        controller.shutdown()
        journal.close()
