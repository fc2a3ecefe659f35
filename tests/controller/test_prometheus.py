"""The controller's Prometheus /metrics: what a scrape says agrees with the stores.

Every expected value here is computed by the test itself, with its own SQL on the
stores and the ledger's totals, never with the exporter's code. Fast tests read
stores written through the project's APIs (a real Controller emits the events and
records the heartbeats, the pattern store and the cost ledger record the rest); the
slow ones scrape the controller of a real supervised run over HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from tests.conftest import Project, emit_every_event, wait_for
from trinity.agents.witness.embedding import load_embedder
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.clock import ManualClock, now_ms
from trinity.contract import HEARTBEATS
from trinity.contract import PROCESSES as PROGRAMS
from trinity.controller.process.controller import Controller
from trinity.controller.process.prometheus import MetricsExporter, StoreCollector, start_exporter
from trinity.errors import ConfigError
from trinity.settings import DEFAULT_METRICS_PORT, Settings
from trinity.stores import runs
from trinity.stores.costs import CallRecord, CostLedger, summarize

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


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def expected_from_stores(root: Path, default_budget_usd: float = 10.0) -> dict[Key, float]:
    """Every sample a scrape must show except the live ones, from the test's own queries."""
    found: dict[Key, float] = {}

    def put(name: str, value: float, **labels: str) -> None:
        found[(name, tuple(sorted(labels.items())))] = float(value)

    for store in STORES:
        put("trinity_store_readable", 1, store=store)
    journal = _ro(root / "trinity_messages.db")
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
    patterns = _ro(root / "trinity_patterns.db")
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
    costs = _ro(root / "trinity_costs.db")
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
    conn = _ro(root / "trinity_costs.db")
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
    conn = _ro(root / "trinity_messages.db")
    try:
        return dict(conn.execute("SELECT name, last_heartbeat_ms FROM agents").fetchall())
    finally:
        conn.close()


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _scrape_bracketed(scrape_now: Callable[[], Scrape], pids: dict[str, int]
                      ) -> tuple[Scrape, dict[str, tuple[int, int]]]:
    """A scrape with every process's RSS read just before and just after it."""
    before = {name: rss_bytes(pid) for name, pid in pids.items()}
    scrape = scrape_now()
    after = {name: rss_bytes(pid) for name, pid in pids.items()}
    return scrape, {name: (min(before[name], after[name]), max(before[name], after[name]))
                    for name in pids}


def _assert_rss(scrape: Scrape, bounds: dict[str, tuple[int, int]]) -> None:
    rss = scrape.by_label("trinity_process_resident_memory_bytes", "process")
    assert rss.keys() == bounds.keys()
    for name, (low, high) in bounds.items():
        # Serving the scrape itself may grow the controller by a few pages.
        assert low - (4 << 20) <= rss[name] <= high + (4 << 20), (name, low, rss[name], high)


# -- a populated set of stores ---------------------------------------------------------


@dataclass
class Stores:
    settings: Settings
    run_id: str
    pids: dict[str, int]  # agent -> pid whose RSS the scrape must report


def _call(run_id: str, n: int, agent: str, model: str, cost: float, status: str = "success",
          local: bool = False) -> CallRecord:
    return CallRecord(
        call_id=f"call-{n}", request_id=f"req-{n}", attempt=1, route="primary", ts_ms=now_ms(),
        sim_elapsed_s=60.0 * n, run_id=run_id, agent=agent,
        provider="embedded" if local else "cloud",
        provider_kind="embedded" if local else "openai", model=model, local=local,
        input_tokens=100 + n, output_tokens=20 + n, cached_tokens=0, reasoning_tokens=0,
        tokens_estimated=False, cost_usd=cost, latency_ms=10.0, status=status,
        error_class=None if status == "success" else "ModelTimeout",
        error=None if status == "success" else "timed out", event_id=None, task_id=None)


def _beat(controller: Controller, agent: str, pid: int) -> None:
    payload = encode_payload({"agent": agent, "pid": pid, "ts_ms": now_ms(), "counters": {}})
    controller.handle_ephemeral(Message(HEARTBEATS, 0, f"hb-{agent}", agent, now_ms(), payload))


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.fixture
def stores(short_dir: Path, sleepers: list[subprocess.Popen[bytes]]) -> Stores:
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_METRICS_PORT": "0"})
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {"time_scale": 1e6, "duration_h": 1.5,
                                         "event_interval_min": 30, "noise_events": 1,
                                         "budget_usd": 2.0})
    controller = Controller(settings, clock=ManualClock())
    controller.initialize()
    try:
        emit_every_event(controller, journal, run)
        # witness: a live process; architect: a process gone since its heartbeat;
        # executor: a pid that a process started after its last heartbeat (pid reuse).
        live, gone, reused = (subprocess.Popen([sys.executable, "-c", "import time; "
                                                "time.sleep(600)"]) for _ in range(3))
        sleepers.extend((live, gone, reused))
        gone.kill()
        gone.wait()
        for agent, proc in (("witness", live), ("architect", gone), ("executor", reused)):
            _beat(controller, agent, proc.pid)
    finally:
        controller.shutdown()
    with journal.transaction() as tx:
        tx.conn.execute("UPDATE agents SET last_heartbeat_ms = last_heartbeat_ms - 60000"
                        " WHERE name='executor'")
        tx.advance_cursor("witness", "telemetry_stream", 2)
        events = [e for (e,) in tx.conn.execute(
            "SELECT event_id FROM events WHERE run_id=? ORDER BY cycle, noise", (run.run_id,))]
        for event_id, delegate, status in ((events[0], "witness", "no_pattern"),
                                           (events[1], "quality_enforcer", "done"),
                                           (events[1], "test_generator", "failed")):
            tx.conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status,"
                            " recorded_ms) VALUES (?, ?, ?, ?, ?, ?)",
                            (f"{event_id}/{delegate}", event_id, run.run_id, delegate, status,
                             now_ms()))
    journal.close()

    embedder = load_embedder()
    store = PatternStore(settings.patterns_db, embedder)
    store.seed([("Fatal error: NoneType in payment processing", "critical_error", "s1"),
                ("User requests dark mode", "feature_request", "s2")])
    for event_id, pattern in zip(events, ("critical_error", "critical_error", None,
                                          "flaky_test"), strict=False):
        vector = embedder.embed([event_id])[0]
        store.record(Detection(pattern=pattern, label=pattern or "none", confidence=0.8,
                               probabilities={}, neighbours=(), vector=vector, notes=()),
                     event_id=event_id, text=f"text of {event_id}", run_id=run.run_id)
    store.record(Detection(pattern="duplication", label="duplication", confidence=0.9,
                           probabilities={}, neighbours=(), vector=embedder.embed(["x"])[0],
                           notes=()), event_id="other-run/c001", text="x", run_id="other-run")
    store.close()

    ledger = CostLedger(settings.costs_db)
    for n, (agent, model, cost, status, local) in enumerate((
            ("architect", "gpt-5", 0.25, "success", False),
            ("architect", "gpt-5", 0.0, "timeout", False),
            ("architect", "smollm2-135m", 0.0, "success", True),
            ("executor", "gpt-5", 0.5, "success", False),
            ("executor", "smollm2-135m", 0.0, "error", True))):
        ledger.record(_call(run.run_id, n, agent, model, cost, status, local))
    ledger.record(_call("other-run", 99, "executor", "gpt-5", 7.0))
    ledger.close()
    return Stores(settings, run.run_id, {"witness": live.pid})


# -- fast tests -----------------------------------------------------------------------


def test_a_scrape_agrees_with_the_stores(stores: Stores) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(stores.settings, {"controller": os.getpid()}))
    root = stores.settings.data_dir
    beats_before = heartbeat_table(root)
    scrape, bounds = _scrape_bracketed(lambda: scrape_registry(registry),
                                       {**stores.pids, "controller": os.getpid()})
    expected = expected_from_stores(root)
    assert_agrees(scrape, expected)
    assert_matches_ledger(scrape, ledger_totals(root, stores.run_id))
    assert_heartbeat_ages(scrape, root, beats_before, heartbeat_table(root))

    # The numbers themselves, as the fixture wrote them.
    assert scrape.value("trinity_run_info", run_id=stores.run_id, status="active") == 1
    assert scrape.value("trinity_run_planned_events") == 6  # 3 cycles, 1 noise event each
    assert scrape.value("trinity_events_emitted_total") == 6
    assert scrape.value("trinity_events_with_outcome_total") == 2
    assert scrape.by_label("trinity_outcomes_total", "status") == {
        "no_pattern": 1, "done": 1, "failed": 1}
    assert scrape.by_label("trinity_detections_total", "pattern") == {
        "critical_error": 2, "constitution_violation": 0, "feature_request": 0,
        "duplication": 0, "flaky_test": 1, "none": 1}  # other-run's detection not counted
    assert scrape.value("trinity_pattern_store_exemplars") == 2 + 3 + 1
    backlog = scrape.by_label("trinity_queue_backlog_messages", "consumer")
    assert backlog["witness"] == 6 - 2
    assert scrape.value("trinity_model_cost_usd_total", agent="executor", model="gpt-5") == 0.5
    assert scrape.value("trinity_model_calls_total", agent="architect", model="gpt-5",
                        status="timeout") == 1
    assert scrape.value("trinity_model_tokens_total", agent="architect", model="gpt-5",
                        direction="input") == 100 + 101
    assert scrape.value("trinity_budget_usd") == 2.0
    assert scrape.value("trinity_budget_remaining_usd") == pytest.approx(2.0 - 0.75)
    ages = scrape.by_label("trinity_agent_heartbeat_age_seconds", "agent")
    assert ages["witness"] < 5 and 60 <= ages["executor"] < 65
    # RSS of the live agent and of the "controller" only: the architect's process is
    # gone, the executor's pid belongs to a process started after its last heartbeat.
    _assert_rss(scrape, bounds)


def test_the_exporter_serves_on_loopback_and_closes(stores: Stores) -> None:
    exporter = MetricsExporter(StoreCollector(stores.settings))
    assert exporter.start(0)
    port = exporter.port
    assert port is not None
    try:
        assert exporter._server is not None
        assert exporter._server.server_address[0] == "127.0.0.1"
        scrape = scrape_http(port)
        assert_agrees(scrape, expected_from_stores(stores.settings.data_dir))
    finally:
        exporter.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_missing_and_corrupt_stores_are_reported_not_raised(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trinity.controller.process.prometheus")
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})
    collector = StoreCollector(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    scrape = scrape_registry(registry)
    assert scrape.types == FAMILIES
    assert scrape.by_label("trinity_store_readable", "store") == dict.fromkeys(STORES, 0.0)
    assert not {k for k in scrape.samples if k[0] != "trinity_store_readable"}

    journal = Journal(settings.messages_db, source="test")  # a journal, no run yet
    journal.close()
    settings.patterns_db.write_bytes(b"not a database" * 100)
    CostLedger(settings.costs_db).close()
    scrape = scrape_registry(registry)
    assert scrape.by_label("trinity_store_readable", "store") == {
        "trinity_messages.db": 1.0, "trinity_patterns.db": 0.0, "trinity_costs.db": 1.0}
    assert "trinity_run_info" not in {k[0] for k in scrape.samples}

    settings.costs_db.write_bytes(b"\0" * 4096)  # a ledger overwritten: read, and refused
    scrape = scrape_registry(registry)
    assert scrape.by_label("trinity_store_readable", "store")["trinity_costs.db"] == 0.0
    # Logged when a store fails, not at every scrape: the pattern store (missing, then
    # corrupt) once; the ledger when missing and again when overwritten.
    failed = [r.getMessage().split()[3].rstrip(":") for r in caplog.records
              if r.levelno == logging.WARNING]
    assert failed == [*STORES, "trinity_costs.db"]
    assert any("trinity_messages.db is readable again" in r.getMessage()
               for r in caplog.records)


def test_port_in_use_is_logged_and_the_controller_goes_on(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                      "TRINITY_METRICS_PORT": str(port)})
        with caplog.at_level(logging.ERROR, logger="trinity.controller.process.prometheus"):
            assert start_exporter(settings) is None
    [record] = caplog.records
    assert f"127.0.0.1:{port}" in record.getMessage()
    assert "in use" in record.getMessage()
    assert "TRINITY_METRICS_PORT" in record.getMessage()


def test_port_zero_turns_the_endpoint_off(short_dir: Path) -> None:
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_METRICS_PORT": "0"})
    assert settings.metrics_port == 0
    assert start_exporter(settings) is None


@pytest.mark.parametrize(("raw", "port"), [(None, DEFAULT_METRICS_PORT), ("", 9464),
                                           ("0", 0), ("1", 1), (" 9100 ", 9100),
                                           ("65535", 65535)])
def test_metrics_port_setting(short_dir: Path, raw: str | None, port: int) -> None:
    env = {"TRINITY_DATA_DIR": str(short_dir)}
    if raw is not None:
        env["TRINITY_METRICS_PORT"] = raw
    assert Settings.from_env(env).metrics_port == port
    assert DEFAULT_METRICS_PORT == 9464


@pytest.mark.parametrize("raw", ["-1", "65536", "99999", "abc", "9464.5", "0x24f8", "1e3"])
def test_bad_metrics_port_is_a_config_error(short_dir: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="TRINITY_METRICS_PORT") as info:
        Settings.from_env({"TRINITY_DATA_DIR": str(short_dir), "TRINITY_METRICS_PORT": raw})
    assert "\n" not in str(info.value)


def test_trinity_run_refuses_a_bad_metrics_port(project: Project) -> None:
    project.env["TRINITY_METRICS_PORT"] = "70000"
    result = project.trinity("run", "--detach")
    assert result.returncode == 2
    assert "TRINITY_METRICS_PORT" in result.stderr and "Traceback" not in result.stderr
    assert not project.supervisor().is_running()


# -- a real supervised run ------------------------------------------------------------


def _free_port() -> int:
    """A port free a moment ago (the endpoint's 0 means off, so the run needs a number);
    should another process take it meanwhile, the test fails on the logged error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _program_pids(project: Project) -> dict[str, int]:
    """The controller's and the agents' pids (crashwatch is supervisord's listener)."""
    found = {}
    for line in project.supervisorctl("status").stdout.splitlines():
        parts = line.split()
        if (len(parts) > 3 and parts[0] in PROGRAMS and parts[1] == "RUNNING"
                and parts[2] == "pid"):
            found[parts[0]] = int(parts[3].rstrip(","))
    return found


def _run_status(project: Project) -> str | None:
    if not project.db.exists():
        return None
    conn = _ro(project.db)
    try:
        row = conn.execute("SELECT status FROM runs").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def _log_lines(project: Project, needle: str) -> list[dict[str, object]]:
    path = project.root / "logs" / "24h_test" / "trinity.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if needle in line]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scrape_of_a_supervised_run_agrees_with_its_stores(project: Project) -> None:
    port = _free_port()
    project.env["TRINITY_METRICS_PORT"] = str(port)
    result = project.trinity("run", "--detach", "--duration", "1.5", "--time-scale", "1440")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: _log_lines(project, "metrics endpoint on"), 30, "the metrics endpoint")
    root = project.root

    # While the run goes on: every agent's heartbeat age and every process's RSS.
    wait_for(lambda: len(heartbeat_table(root)) == 3, 90, "heartbeats from all three agents")
    pids = _program_pids(project)
    beats_before = heartbeat_table(root)
    scrape, bounds = _scrape_bracketed(lambda: scrape_http(port), pids)
    assert_heartbeat_ages(scrape, root, beats_before, heartbeat_table(root))
    ages = scrape.by_label("trinity_agent_heartbeat_age_seconds", "agent")
    assert max(ages.values()) < 3  # one beat a second, three missed = silent
    _assert_rss(scrape, bounds)

    # Once the run has ended its records stop changing: the scrape must match them all.
    wait_for(lambda: _run_status(project) not in (None, "active"), 240, "the run to end")
    for _ in range(20):
        expected = expected_from_stores(root)
        scrape = scrape_http(port)
        if expected == expected_from_stores(root):  # nothing moved during the scrape
            break
        time.sleep(0.5)
    assert_agrees(scrape, expected)
    run_id = next(dict(k[1])["run_id"] for k in scrape.samples if k[0] == "trinity_run_info")
    assert_matches_ledger(scrape, ledger_totals(root, run_id))
    assert scrape.value("trinity_run_info", run_id=run_id, status="completed") == 1
    assert scrape.value("trinity_events_emitted_total") == 3
    assert scrape.value("trinity_events_with_outcome_total") == 3
    assert sum(scrape.by_label("trinity_detections_total", "pattern").values()) == 3
    assert sum(v for (n, _), v in scrape.samples.items()
               if n == "trinity_model_calls_total") >= 2  # ARCHITECT and EXECUTOR called
    assert not _log_lines(project, "cannot listen")

    # Stopping the controller closes the endpoint with it.
    project.supervisorctl("stop", "controller")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert _log_lines(project, "controller stopped cleanly")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_port_in_use_does_not_stop_the_supervised_controller(project: Project) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        project.env["TRINITY_METRICS_PORT"] = str(port)
        result = project.trinity("run", "--detach", "--duration", "2", "--time-scale", "1440")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: _log_lines(project, "cannot listen"), 30,
                 "the port-in-use error in trinity.log")
        [error] = _log_lines(project, "cannot listen")
        assert error["level"] == "ERROR" and error["process"] == "controller"
        assert f"127.0.0.1:{port}" in str(error["msg"])
        controller = _program_pids(project)["controller"]
        # The controller goes on: it emits the run's events, on the same pid.
        conn = _ro(project.db)
        try:
            wait_for(lambda: conn.execute("SELECT count(*) FROM events").fetchone()[0] >= 2,
                     60, "the controller to emit events")
        finally:
            conn.close()
        assert _program_pids(project)["controller"] == controller
        assert len(_log_lines(project, "cannot listen")) == 1
