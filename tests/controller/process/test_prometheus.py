"""The controller's Prometheus /metrics: what a scrape says agrees with the stores.

Every expected value here is computed by the test itself, with its own SQL on the
stores and the ledger's totals, never with the exporter's code. Fast tests read
stores written through the project's APIs (a real Controller emits the events and
records the heartbeats, the pattern store and the cost ledger record the rest). The
scrape of a real supervised run over HTTP is tests/system/test_prometheus.py.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from tests.conftest import Project, emit_every_event
from tests.controller.process._prometheus import (
    FAMILIES,
    STORES,
    assert_agrees,
    assert_heartbeat_ages,
    assert_matches_ledger,
    assert_rss,
    expected_from_stores,
    heartbeat_table,
    ledger_totals,
    scrape_bracketed,
    scrape_http,
    scrape_registry,
)
from trinity.agents.witness.embedding import load_embedder
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.bus.message import Message, encode_payload
from trinity.clock import ManualClock, now_ms
from trinity.contract import HEARTBEATS
from trinity.controller.process.controller import Controller
from trinity.controller.process.prometheus import MetricsExporter, StoreCollector, start_exporter
from trinity.errors import ConfigError
from trinity.settings import DEFAULT_METRICS_PORT, Settings
from trinity.stores import runs
from trinity.stores.costs import CallRecord, CostLedger

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
    for event_id, pattern, word in zip(events, ("critical_error", "critical_error", None,
                                                "flaky_test"), "abcd", strict=False):
        vector = embedder.embed([event_id])[0]
        # texts that differ in more than a number: each detection is learned as its own
        store.record(Detection(pattern=pattern, label=pattern or "none", confidence=0.8,
                               probabilities={}, neighbours=(), vector=vector, notes=()),
                     event_id=event_id, text=f"text {word} of {event_id}", run_id=run.run_id)
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
    scrape, bounds = scrape_bracketed(lambda: scrape_registry(registry),
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
    assert_rss(scrape, bounds)


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
