"""The controller's Prometheus ``/metrics`` endpoint (text format, loopback only).

A custom collector on its own registry reads the stores at scrape time, on read-only
connections, so a value is never older than the scrape and the exporter never writes
to a run's store. Run-scoped families describe the latest run recorded (active or
ended); each family is always present, with no samples when there is nothing to count.

    trinity_store_readable{store}                       1 if read at this scrape, 0 if not
    trinity_run_info{run_id,status}                     1 for the latest run
    trinity_run_simulated_elapsed_seconds               its last checkpoint
    trinity_run_planned_events                          events it will emit in all
    trinity_events_emitted_total                        events emitted
    trinity_events_with_outcome_total                   events with at least one outcome
    trinity_outcomes_total{delegate,status}             outcomes recorded for its events
    trinity_detections_total{pattern}                   WITNESS's decisions (none: no pattern)
    trinity_pattern_store_exemplars                     exemplars in the pattern store
    trinity_queue_backlog_messages{stream,consumer}     head minus the durable cursor
    trinity_agent_heartbeat_age_seconds{agent}          since the last heartbeat recorded
    trinity_model_calls_total{agent,model,status}       model call attempts in the ledger
    trinity_model_cost_usd_total{agent,model}           their cost
    trinity_model_tokens_total{agent,model,direction}   their tokens (input, output)
    trinity_budget_usd                                  the run's budget
    trinity_budget_remaining_usd                        budget minus spent (< 0 once exceeded)
    trinity_process_resident_memory_bytes{process}      RSS of each Trinity process

The endpoint is served by ``prometheus_client`` on 127.0.0.1 only. A port already in
use is logged as an error and the controller goes on without the endpoint.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from trinity.contract import LABELS, NONE
from trinity.db import reading
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import journal as journal_store
from trinity.stores import patterns as pattern_store

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# psutil derives a process's start time from the boot time in whole seconds: a process
# that started up to this long after an agent's last heartbeat may still have sent it.
_START_TIME_SLACK_S = 2.0

Family = GaugeMetricFamily | CounterMetricFamily
T = TypeVar("T")


def _families() -> dict[str, Family]:
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    return {
        "store": gauge("trinity_store_readable",
                       "1 if the store could be read at this scrape, 0 if missing or unreadable",
                       labels=["store"]),
        "run": gauge("trinity_run_info", "The latest run recorded (value 1): id and status",
                     labels=["run_id", "status"]),
        "sim": gauge("trinity_run_simulated_elapsed_seconds",
                     "Simulated time of the latest run at its last checkpoint"),
        "planned": gauge("trinity_run_planned_events", "Events the latest run emits in all"),
        "emitted": counter("trinity_events_emitted", "Events emitted in the latest run"),
        "completed": counter("trinity_events_with_outcome",
                             "Events of the latest run with at least one recorded outcome"),
        "outcomes": counter("trinity_outcomes", "Outcomes recorded for the latest run's events",
                            labels=["delegate", "status"]),
        "detections": counter(
            "trinity_detections",
            f"WITNESS's decisions on the latest run's events by pattern ({NONE}: "
            "no pattern)", labels=["pattern"]),
        "exemplars": gauge("trinity_pattern_store_exemplars",
                           "Exemplars in the pattern store (all runs)"),
        "backlog": gauge("trinity_queue_backlog_messages",
                         "Messages published on a queue and not yet applied by its consumer",
                         labels=["stream", "consumer"]),
        "heartbeat": gauge("trinity_agent_heartbeat_age_seconds",
                           "Seconds since the controller recorded the agent's last heartbeat",
                           labels=["agent"]),
        "calls": counter("trinity_model_calls", "Model call attempts of the latest run",
                         labels=["agent", "model", "status"]),
        "cost": counter("trinity_model_cost_usd", "Cost of the latest run's model calls",
                        labels=["agent", "model"]),
        "tokens": counter("trinity_model_tokens", "Tokens of the latest run's model calls",
                          labels=["agent", "model", "direction"]),
        "budget": gauge("trinity_budget_usd", "The latest run's model budget"),
        "remaining": gauge("trinity_budget_remaining_usd",
                           "Budget minus the latest run's spend (negative once exceeded)"),
        "rss": gauge("trinity_process_resident_memory_bytes",
                     "Resident memory of each Trinity process, measured at the scrape",
                     labels=["process"]),
    }


class StoreCollector(Collector):
    """The stores of ``settings.data_dir``, read at every scrape.

    ``processes`` (name -> pid) are measured beside the agents that recorded a
    heartbeat: the controller passes itself. Scrapes may run concurrently (one thread
    per request): each has its own connections and state."""

    def __init__(self, settings: Settings, processes: Mapping[str, int] | None = None) -> None:
        self.settings = settings
        self.processes = dict(processes or {})
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        scrape = _Scrape(self.settings, self._readable)
        agent_pids = scrape.journal()
        scrape.patterns()
        scrape.costs()
        for name, pid in sorted({**agent_pids, **self.processes}.items()):
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:  # exited since its heartbeat
                continue
            scrape.found["rss"].add_metric([name], float(rss))
        yield from scrape.found.values()

    def _readable(self, store: str, error: sqlite3.Error | None) -> None:
        """Log a store becoming unreadable or readable again, not every scrape."""
        with self._lock:
            if error is not None and store not in self._failing:
                self._failing.add(store)
                log.warning("metrics: cannot read %s: %s", store, error)
            elif error is None and store in self._failing:
                self._failing.discard(store)
                log.info("metrics: %s is readable again", store)


@dataclass(frozen=True)
class _JournalView:
    run: runs.Run | None
    progress: dict[str, int]
    outcomes: list[tuple[str, str, int]]
    backlogs: list[journal_store.Backlog]
    heartbeats: list[runs.Heartbeat]


def _read_journal(conn: sqlite3.Connection) -> _JournalView:
    # A journal no controller has opened yet lacks the run and agent tables: no run then.
    run = runs.latest_run(conn)
    progress: dict[str, int] = {}
    outcomes: list[tuple[str, str, int]] = []
    if run is not None:
        progress = runs.progress(conn, run.run_id)
        counted = Counter((o.delegate, o.status) for o in runs.outcomes(conn, run.run_id))
        outcomes = [(d, s, n) for (d, s), n in sorted(counted.items())]
    return _JournalView(run, progress, outcomes, journal_store.backlogs(conn),
                        runs.heartbeats(conn))


class _Scrape:
    """One scrape: the families, filled store by store."""

    def __init__(self, settings: Settings,
                 report: Callable[[str, sqlite3.Error | None], None]) -> None:
        self.settings = settings
        self.report = report
        self.found = _families()
        self.run: runs.Run | None = None

    def _read(self, path: Path, read: Callable[[sqlite3.Connection], T]) -> T | None:
        """``read(conn)`` on a read-only connection in one read transaction (a consistent
        view of the store); None, and the store marked unreadable, if that fails."""
        try:
            with reading(path) as conn:
                result = read(conn)
        except sqlite3.Error as exc:
            self._readable(path, exc)
            return None
        self._readable(path, None)
        return result

    def _readable(self, path: Path, error: sqlite3.Error | None) -> None:
        self.found["store"].add_metric([path.name], 0.0 if error else 1.0)
        self.report(path.name, error)

    def journal(self) -> dict[str, int]:
        """Run, events, outcomes, backlogs, heartbeats; returns the agents' live pids."""
        view = self._read(self.settings.messages_db, _read_journal)
        if view is None:
            return {}
        found, run = self.found, view.run
        if run is not None:
            self.run = run
            found["run"].add_metric([run.run_id, run.status], 1.0)
            found["sim"].add_metric([], run.sim_elapsed_s)
            found["planned"].add_metric([], float(run.total_events))
            found["emitted"].add_metric([], float(view.progress["emitted"]))
            found["completed"].add_metric([], float(view.progress["completed"]))
        for delegate, status, count in view.outcomes:
            found["outcomes"].add_metric([delegate, status], float(count))
        for backlog in view.backlogs:
            found["backlog"].add_metric([backlog.stream, backlog.consumer],
                                        float(backlog.pending))
        return _heartbeats(found["heartbeat"], view.heartbeats)

    def patterns(self) -> None:
        run_id = self.run.run_id if self.run else None

        def read(conn: sqlite3.Connection) -> tuple[int, dict[str, pattern_store.Decision]]:
            return (pattern_store.exemplar_count(conn),
                    pattern_store.run_decisions(conn, run_id) if run_id else {})

        found = self._read(self.settings.patterns_db, read)
        if found is None:
            return
        exemplars, decided = found
        self.found["exemplars"].add_metric([], float(exemplars))
        if run_id is None:
            return
        counts = dict.fromkeys(LABELS, 0)
        for decision in decided.values():
            label = decision.pattern or NONE
            counts[label] = counts.get(label, 0) + 1
        for pattern, count in counts.items():
            self.found["detections"].add_metric([pattern], float(count))

    def costs(self) -> None:
        # Without a run the query still reads the ledger (and finds nothing).
        run_id = self.run.run_id if self.run else None
        rows = self._read(self.settings.costs_db, lambda conn: costs.usage(conn, run_id))
        if rows is None or self.run is None:
            return
        by_model: dict[tuple[str, str], list[float]] = {}
        for agent, model, status, calls, cost, tokens_in, tokens_out in rows:
            self.found["calls"].add_metric([agent, model, status], float(calls))
            totals = by_model.setdefault((agent, model), [0.0, 0.0, 0.0])
            totals[0] += cost
            totals[1] += tokens_in
            totals[2] += tokens_out
        for (agent, model), (spent, used_in, used_out) in by_model.items():
            self.found["cost"].add_metric([agent, model], spent)
            self.found["tokens"].add_metric([agent, model, "input"], used_in)
            self.found["tokens"].add_metric([agent, model, "output"], used_out)
        budget = runs.budget_usd(self.run, self.settings.budget_usd)
        self.found["budget"].add_metric([], budget)
        self.found["remaining"].add_metric([], budget - sum(t[0] for t in by_model.values()))


def _heartbeats(family: Family, rows: list[runs.Heartbeat]) -> dict[str, int]:
    """Heartbeat ages from the agents' last recorded heartbeats; the pids of live agents
    (a pid whose process started after its last heartbeat is another process now)."""
    now_s = time.time()
    pids: dict[str, int] = {}
    for name, pid, last_ms in ((h.agent, h.pid, h.last_ms) for h in rows):
        family.add_metric([name], max(0.0, now_s - last_ms / 1000))
        if pid is None:
            continue
        try:
            started_s = psutil.Process(pid).create_time()
        except psutil.Error:
            continue
        if started_s <= last_ms / 1000 + _START_TIME_SLACK_S:
            pids[name] = int(pid)
    return pids


class MetricsExporter:
    """``/metrics`` over HTTP for one collector, on its own registry."""

    def __init__(self, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port listened on (None when not serving)."""
        return int(self._server.server_port) if self._server is not None else None

    def start(self, port: int, addr: str = LOOPBACK) -> bool:
        """Serve on ``addr:port`` (0: any free port); False, logged, if it cannot."""
        try:
            self._server, self._thread = start_http_server(port, addr=addr,
                                                           registry=self.registry)
        except OSError as exc:
            log.error("metrics endpoint: cannot listen on %s:%d (%s); going on without "
                      "/metrics (set TRINITY_METRICS_PORT to a free port, or 0 to turn it off)",
                      addr, port, exc.strerror or exc)
            return False
        log.info("metrics endpoint on http://%s:%d/metrics", addr, self.port)
        return True

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def start_exporter(settings: Settings,
                   processes: Mapping[str, int] | None = None) -> MetricsExporter | None:
    """The controller's exporter on ``settings.metrics_port``; None when that is 0 (off)
    or the port cannot be listened on."""
    if not settings.metrics_port:
        log.info("metrics endpoint off (TRINITY_METRICS_PORT=0)")
        return None
    exporter = MetricsExporter(StoreCollector(settings, processes))
    return exporter if exporter.start(settings.metrics_port) else None
