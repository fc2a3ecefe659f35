"""Reading a Prometheus scrape and the stores it must agree with, each expected value
computed with the test's own SQL on the stores and the ledger's totals, never with the
exporter's code: shared by the exporter's tests (tests/controller/process/test_prometheus.py)
and the scrape of a supervised run (tests/system/test_prometheus.py)."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from trinity.stores.costs import summarize

# The plan's five patterns, and "none" for an event WITNESS found no pattern in.
PATTERNS = ("critical_error", "constitution_violation", "feature_request", "duplication",
            "flaky_test", "none")
STORES = ("trinity_messages.db", "trinity_patterns.db", "trinity_costs.db")
FAMILIES = {
    "trinity_store_readable": "gauge", "trinity_run_info": "gauge",
    "trinity_run_simulated_elapsed_seconds": "gauge", "trinity_run_planned_events": "gauge",
    "trinity_events_emitted": "counter", "trinity_events_with_outcome": "counter",
    "trinity_outcomes": "counter", "trinity_detections": "counter",
    "trinity_pattern_store_exemplars": "gauge", "trinity_queue_backlog_messages": "gauge",
    "trinity_agent_heartbeat_age_seconds": "gauge", "trinity_model_calls": "counter",
    "trinity_model_cost_usd": "counter", "trinity_model_tokens": "counter",
    "trinity_budget_usd": "gauge", "trinity_budget_remaining_usd": "gauge",
    "trinity_process_resident_memory_bytes": "gauge",
}
# Measured at the scrape instant (compared within brackets, not for equality).
LIVE = ("trinity_agent_heartbeat_age_seconds", "trinity_process_resident_memory_bytes")

Key = tuple[str, tuple[tuple[str, str], ...]]


# -- reading a scrape and the stores ------------------------------------------------


@dataclass
class Scrape:
    types: dict[str, str]
    samples: dict[Key, float]
    started_s: float
    ended_s: float

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {dict(k[1])[label]: v for k, v in self.samples.items() if k[0] == name}


def parse(text: str, started_s: float, ended_s: float) -> Scrape:
    types: dict[str, str] = {}
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return Scrape(types, samples, started_s, ended_s)


def scrape_registry(registry: CollectorRegistry) -> Scrape:
    started = time.time()
    text = generate_latest(registry).decode()
    return parse(text, started, time.time())


def scrape_http(port: int) -> Scrape:
    started = time.time()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return parse(text, started, time.time())


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def expected_from_stores(root: Path, default_budget_usd: float = 10.0) -> dict[Key, float]:
    """Every sample a scrape must show except the live ones, from the test's own queries."""
    found: dict[Key, float] = {}

    def put(name: str, value: float, **labels: str) -> None:
        found[(name, tuple(sorted(labels.items())))] = float(value)

    for store in STORES:
        put("trinity_store_readable", 1, store=store)
    journal = read_only(root / "trinity_messages.db")
    try:
        run_id, status, config_text, sim = journal.execute(
            "SELECT run_id, status, config, sim_elapsed_s FROM runs"
            " ORDER BY started_ms DESC, rowid DESC LIMIT 1").fetchone()
        config = json.loads(config_text)
        put("trinity_run_info", 1, run_id=run_id, status=status)
        put("trinity_run_simulated_elapsed_seconds", sim)
        cycles = int(config["duration_h"] * 3600 // (config["event_interval_min"] * 60))
        put("trinity_run_planned_events", cycles * (1 + int(config.get("noise_events", 0))))
        put("trinity_events_emitted_total", journal.execute(
            "SELECT count(*) FROM events WHERE run_id=?", (run_id,)).fetchone()[0])
        put("trinity_events_with_outcome_total", journal.execute(
            "SELECT count(*) FROM events WHERE run_id=? AND event_id IN"
            " (SELECT event_id FROM outcomes)", (run_id,)).fetchone()[0])
        for delegate, outcome, count in journal.execute(
                "SELECT delegate, status, count(*) FROM outcomes WHERE event_id IN"
                " (SELECT event_id FROM events WHERE run_id=?) GROUP BY 1, 2", (run_id,)):
            put("trinity_outcomes_total", count, delegate=delegate, status=outcome)
        for stream, consumer, pending in journal.execute(
                "SELECT c.stream, c.consumer, s.head - c.seq FROM cursors c, streams s"
                " WHERE s.stream = c.stream"):
            put("trinity_queue_backlog_messages", pending, stream=stream, consumer=consumer)
    finally:
        journal.close()
    patterns = read_only(root / "trinity_patterns.db")
    try:
        put("trinity_pattern_store_exemplars",
            patterns.execute("SELECT count(*) FROM exemplars").fetchone()[0])
        counts = dict.fromkeys(PATTERNS, 0) | dict(patterns.execute(
            "SELECT coalesce(pattern, 'none'), count(*) FROM detections WHERE run_id=?"
            " GROUP BY 1", (run_id,)).fetchall())
    finally:
        patterns.close()
    for pattern, count in counts.items():
        put("trinity_detections_total", count, pattern=pattern)
    costs = read_only(root / "trinity_costs.db")
    try:
        rows = costs.execute(
            "SELECT agent, model, status, count(*), sum(cost_usd), sum(input_tokens),"
            " sum(output_tokens) FROM calls WHERE run_id=? GROUP BY 1, 2, 3",
            (run_id,)).fetchall()
        spent = costs.execute("SELECT coalesce(sum(cost_usd), 0) FROM calls WHERE run_id=?",
                              (run_id,)).fetchone()[0]
    finally:
        costs.close()
    pairs: dict[tuple[str, str], list[float]] = {}
    for agent, model, call_status, calls, cost, tokens_in, tokens_out in rows:
        put("trinity_model_calls_total", calls, agent=agent, model=model, status=call_status)
        pair = pairs.setdefault((agent, model), [0.0, 0, 0])
        pair[0] += cost
        pair[1] += tokens_in
        pair[2] += tokens_out
    for (agent, model), (cost, tokens_in, tokens_out) in pairs.items():
        put("trinity_model_cost_usd_total", cost, agent=agent, model=model)
        put("trinity_model_tokens_total", tokens_in, agent=agent, model=model, direction="input")
        put("trinity_model_tokens_total", tokens_out, agent=agent, model=model,
            direction="output")
    budget = float(config.get("budget_usd", default_budget_usd))
    put("trinity_budget_usd", budget)
    put("trinity_budget_remaining_usd", budget - spent)
    return found


def ledger_totals(root: Path, run_id: str) -> dict[str, object]:
    """The cost ledger's own totals for the run (costs.summarize over its rows)."""
    conn = read_only(root / "trinity_costs.db")
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM calls WHERE run_id=?", (run_id,))]
    finally:
        conn.close()
    return summarize(rows)


def assert_agrees(scrape: Scrape, expected: dict[Key, float]) -> None:
    assert scrape.types == FAMILIES  # every family, always, with its type
    got = {k: v for k, v in scrape.samples.items() if k[0] not in LIVE}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def assert_matches_ledger(scrape: Scrape, totals: dict[str, object]) -> None:
    """Costs by agent and by model sum to the ledger's own totals."""
    for label, group in (("agent", "by_agent"), ("model", "by_model")):
        ledger = totals[group]
        assert isinstance(ledger, dict)
        for kind, field in (("trinity_model_cost_usd_total", "cost_usd"),
                            ("trinity_model_calls_total", "calls")):
            sums: dict[str, float] = {}
            for (name, labels), value in scrape.samples.items():
                if name == kind:
                    sums[dict(labels)[label]] = sums.get(dict(labels)[label], 0.0) + value
            assert sums == pytest.approx({k: v[field] for k, v in ledger.items()}, abs=1e-6)
    by_status = totals["by_status"]
    assert isinstance(by_status, dict)
    for status, calls in by_status.items():
        assert sum(v for (n, labels), v in scrape.samples.items()
                   if n == "trinity_model_calls_total" and dict(labels)["status"] == status) \
            == calls


def assert_heartbeat_ages(scrape: Scrape, root: Path, before: dict[str, int],
                          after: dict[str, int]) -> None:
    """Each age is the scrape instant minus a last heartbeat recorded in the agents table
    between the reads taken before and after the scrape."""
    ages = scrape.by_label("trinity_agent_heartbeat_age_seconds", "agent")
    assert ages.keys() == after.keys()
    for agent, age in ages.items():
        low = scrape.started_s - after[agent] / 1000 - 0.002
        high = scrape.ended_s - before[agent] / 1000 + 0.002
        assert low <= age <= high, (agent, low, age, high)


def heartbeat_table(root: Path) -> dict[str, int]:
    conn = read_only(root / "trinity_messages.db")
    try:
        return dict(conn.execute("SELECT name, last_heartbeat_ms FROM agents").fetchall())
    finally:
        conn.close()


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def scrape_bracketed(scrape_now: Callable[[], Scrape], pids: dict[str, int]
                      ) -> tuple[Scrape, dict[str, tuple[int, int]]]:
    """A scrape with every process's RSS read just before and just after it."""
    before = {name: rss_bytes(pid) for name, pid in pids.items()}
    scrape = scrape_now()
    after = {name: rss_bytes(pid) for name, pid in pids.items()}
    return scrape, {name: (min(before[name], after[name]), max(before[name], after[name]))
                    for name in pids}


def assert_rss(scrape: Scrape, bounds: dict[str, tuple[int, int]]) -> None:
    rss = scrape.by_label("trinity_process_resident_memory_bytes", "process")
    assert rss.keys() == bounds.keys()
    for name, (low, high) in bounds.items():
        # Serving the scrape itself may grow the controller by a few pages.
        assert low - (4 << 20) <= rss[name] <= high + (4 << 20), (name, low, rss[name], high)
