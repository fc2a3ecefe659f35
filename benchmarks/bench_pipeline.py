"""Benchmark: the whole pipeline, event to durably recorded outcome, with instant models.

    python benchmarks/bench_pipeline.py   # BENCH_SHORT=1: shorter phases; BENCH_N=... events
                                          # in the throughput phase

Real processes on real sockets and the real journal: ``trinity agent witness``,
``architect`` and ``executor`` on a temporary data dir, and this process in the
controller's place (its bus node, named ``controller``, publishes on telemetry_stream
exactly as the controller's ``_emit`` does: the event and its ``events`` row in one
transaction, then the wire). The model calls go to the ``instant`` provider
(``agents/providers/instant.py``: a schema-valid answer at once), selected by a
routing policy file given through ``TRINITY_ROUTING`` and enabled by
``TRINITY_INSTANT_PROVIDER=1``, so what is measured is the pipeline itself: bus,
journal, WITNESS's classification and learning, router, cost ledger, validation.

An event is done when its outcome row is committed: a poller on its own read-only
connection to the journal sees it (every 1 ms in the paced phases, so latencies are
over by at most that). Phases, in this order (the stores grow from one to the next):

0. WITNESS's pattern store is filled to 10,000 exemplars (``BENCH_EXEMPLARS``) before the
   agents start: the dev set it seeds on a fresh install plus recombined dev-set messages
   (``exemplar_fill.py``, as in bench-witness), so its search runs at the size the target
   names.
1. warm-up: 20 events, one at a time.
2. paced: events published one per transaction at a fixed rate, for 1x, 10x and 100x the
   plan's event rate, then 200 events/s. The plan emits one event per 30 simulated
   minutes; at the demo's time scale 2880 (simulated s per real s, the Makefile's
   DEMO_TIME_SCALE) that is one event per 0.625 s, 1.6 events/s. Figures: p50/p99
   event-to-outcome latency, the delivered rate, and p50/p99 of each stage's span from
   the stores' own millisecond stamps (event committed here -> signal journaled by
   WITNESS -> task journaled by ARCHITECT -> outcome recorded by EXECUTOR).
3. throughput: N events (BENCH_SHORT: 5,000; else 20,000) published as fast as the
   publisher can, in transactions of 500; events/s = N / (first publish to last outcome).
   Each stage's cursor is sampled meanwhile, so the stage that bounds it shows, and each
   agent's CPU time per message it applied (so what both cores could do at best).

Throughout, each agent's RSS is sampled with the stores' sizes (exemplars WITNESS has
learned, journal messages, ledger rows, and their files).

Reference, measured in the same run on the same file system before the agents start:
the raw journal, one event published per transaction (the unit of work each stage
commits per event), as commits/s and p99 commit time. Targets: >= 2,000 events/s end
to end; p99 <= 50 ms at 200 events/s; WITNESS <= 0.5 ms of CPU per event in the
throughput phase at 10,000 exemplars. Prints a table, writes
``reports/bench_pipeline.json``, exits 1 when a target is missed.
``BENCH_GATE=latency,witness`` makes only those targets' misses fail the run (every
missed target is still printed). ``BENCH_PROFILE=DIR`` runs each agent under cProfile
and writes ``DIR/<agent>.prof``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from report_rows import figure, format_table, write_report

from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, message_id
from trinity.bus.message import encode_payload
from trinity.bus.node import BusNode
from trinity.contract import ALERTS, EXECUTION, HEARTBEATS, IMPROVEMENT, TELEMETRY, TOPOLOGY
from trinity.controller.process.scenario import event_for_cycle
from trinity.db import open_readonly
from trinity.settings import Settings
from trinity.stores import runs

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "bench_pipeline.json"
BIN = Path(sys.executable).parent
AGENTS = ("witness", "architect", "executor")
# Which stream each agent applies, and so which cursor shows its progress.
STAGES = {"witness": TELEMETRY, "architect": IMPROVEMENT, "executor": EXECUTION}

TIME_SCALE = 2880.0            # the demo's: the Makefile's DEMO_TIME_SCALE
PLAN_EVENT_INTERVAL_S = 1800.0  # the plan: one event per 30 simulated minutes
PLAN_RATE = TIME_SCALE / PLAN_EVENT_INTERVAL_S  # 1.6 events per real second
LATENCY_RATE = 200.0
TARGET_EVENTS_PER_S = 2000.0
TARGET_P99_MS = 50.0
# WITNESS's pattern store before the agents start (BENCH_EXEMPLARS to change): the size at
# which its CPU per event is held to the target below
EXEMPLARS = 10_000
TARGET_WITNESS_CPU_MS = 0.5
# The RSS slope over exemplars is printed only over at least this many learned ones.
SLOPE_SPAN = 1000
BATCH = 500  # events per transaction in the throughput phase
POLICY = """\
# The benchmark's routing policy: every call answered at once by the instant provider.
[call]
timeout_s = 30.0
max_attempts = 1

[providers.instant]
kind = "instant"

[[routes]]
chain = ["instant"]
"""
INSERT_EVENT = ("INSERT INTO events(event_id, run_id, cycle, noise, category, emitted_ms,"
                " sim_elapsed_s) VALUES (?, ?, ?, 0, ?, ?, 0)")


def _ms(seconds: list[float]) -> dict[str, float]:
    values = sorted(s * 1000 for s in seconds)
    if len(values) < 2:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(values[-1], 2)}


# -- agents ----------------------------------------------------------------------------


def run_agent(name: str, profile_dir: Path) -> int:
    """``trinity agent NAME`` under cProfile (BENCH_PROFILE): the same four lines."""
    import cProfile

    from trinity import logs
    from trinity.agents.architect import Architect
    from trinity.agents.executor import Executor
    from trinity.agents.witness.process import Witness

    settings = Settings.from_env()
    logs.configure(name, settings.log_dir / "trinity.log")
    cls = {"witness": Witness, "architect": Architect, "executor": Executor}[name]
    profile = cProfile.Profile()
    profile.enable()
    try:
        return cls(settings).run()
    finally:
        profile.disable()
        profile.dump_stats(str(profile_dir / f"{name}.prof"))


@dataclass
class Sample:
    t: float
    rss_mb: dict[str, float]
    exemplars: int
    journal_messages: int
    ledger_calls: int
    store_mb: float


@dataclass
class Watch:
    """What the poller thread has seen: outcomes by event, cursors, memory samples."""

    seen: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    cursors: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    interval_s: float = 0.001
    sample_cursors: bool = False


class Pipeline:
    """The three agents on a temporary data dir, and this process as the controller."""

    def __init__(self, profile_dir: Path | None) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        self.run_dir = Path(tempfile.mkdtemp(prefix="bp", dir="/tmp"))
        self.profile_dir = profile_dir
        policy = self.data_dir / "routing-instant.toml"
        policy.write_text(POLICY)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
        self.env.update({
            "PATH": f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
            "TRINITY_DATA_DIR": str(self.data_dir), "TRINITY_RUN_DIR": str(self.run_dir),
            "TRINITY_TIME_SCALE": str(TIME_SCALE), "TRINITY_ROUTING": str(policy),
            "TRINITY_INSTANT_PROVIDER": "1"})
        self.settings = Settings.from_env(self.env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.watch = Watch()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.cycle = 0
        self.marks: list[tuple[str, Sample]] = []
        self.sent_ms: dict[str, int] = {}  # event id -> wall-clock ms of its commit here

    # -- set-up and tear-down ------------------------------------------------------

    def fill_patterns(self, size: int) -> int:
        """WITNESS's pattern store holding ``size`` exemplars before it starts (built by a
        child, so this process stays the light controller it stands in for)."""
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("exemplar_fill.py")),
                              str(self.settings.patterns_db), str(size)], env=self.env,
                             check=True, capture_output=True, text=True, timeout=900).stdout
        return int(out.split()[-1])

    def start(self) -> None:
        self.journal = Journal(self.settings.messages_db, source="controller")
        self.node = BusNode("controller", BusConfig.of(self.settings), self.journal, TOPOLOGY,
                            publishes=(TELEMETRY, ALERTS), isolate_each=False)
        self.run = runs.create_run(self.journal.conn, {
            "time_scale": TIME_SCALE, "duration_h": 24.0,
            "event_interval_min": PLAN_EVENT_INTERVAL_S / 60, "budget_usd": 10.0,
            "budget_mode": "warn", "benchmark": "bench_pipeline"})
        logs = self.data_dir / "agent-logs"
        logs.mkdir()
        for name in AGENTS:
            if self.profile_dir is not None:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--agent", name]
            else:
                cmd = [str(BIN / "trinity"), "agent", name]
            with open(logs / f"{name}.log", "wb") as out:
                self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=self.data_dir,
                                                    stdout=out, stderr=subprocess.STDOUT)
        self._await_heartbeats(timeout_s=180)
        self._poller = threading.Thread(target=self._poll, name="outcomes", daemon=True)
        self._poller.start()

    def _await_heartbeats(self, timeout_s: float) -> None:
        """Every agent has started its loop (its first heartbeat reached us)."""
        beating: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while beating != set(AGENTS):
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"agents not beating after {timeout_s:.0f} s: "
                                 f"{sorted(set(AGENTS) - beating)}")
            self.node.receive(timeout_ms=100)
            for msg in self.node.ephemeral_inbox:
                if msg.stream == HEARTBEATS:
                    beating.add(str(msg.json().get("agent")))
            self.node.ephemeral_inbox.clear()

    def witness_text_cache(self) -> dict[str, int]:
        """WITNESS's text-cache counters (texts decided without embedding or n-grams, and
        texts worked out) from its next heartbeat, the ones already queued dropped."""
        for _ in range(1000):
            if not self.node.receive(timeout_ms=0):
                break
        self.node.ephemeral_inbox.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.node.receive(timeout_ms=100)
            beats = [m.json() for m in self.node.ephemeral_inbox if m.stream == HEARTBEATS]
            self.node.ephemeral_inbox.clear()
            for beat in beats:
                if beat.get("agent") == "witness" and "text_cache" in beat:
                    return {k: int(v) for k, v in beat["text_cache"].items()}
        raise SystemExit("no heartbeat from WITNESS with its text-cache counters in 10 s")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = (self.data_dir / "agent-logs" / f"{name}.log").read_text(errors="replace")
                raise SystemExit(f"{name} exited {proc.returncode}:\n{log[-3000:]}")

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if hasattr(self, "node"):
            self.node.close()
            self.journal.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- the poller --------------------------------------------------------------------

    def _poll(self) -> None:
        """Outcomes as they become durable; cursors and memory now and then."""
        journal = open_readonly(self.settings.messages_db)
        patterns = ledger = None
        last_rowid = 0
        next_sample = 0.0
        watch = self.watch
        while not self._stop.is_set():
            rows = journal.execute(
                "SELECT rowid, event_id, delegate, status FROM outcomes WHERE rowid > ?"
                " ORDER BY rowid", (last_rowid,)).fetchall()
            now = time.monotonic()
            for rowid, event_id, delegate, status in rows:
                last_rowid = rowid
                watch.seen.setdefault(event_id, (now, delegate, status))
            if watch.sample_cursors:
                watch.cursors.append((now, {consumer: seq for consumer, stream, seq in
                                            journal.execute("SELECT consumer, stream, seq"
                                                            " FROM cursors")
                                            if STAGES.get(consumer) == stream}))
            if now >= next_sample:
                next_sample = now + 1.0
                if patterns is None and self.settings.patterns_db.exists():
                    patterns = open_readonly(self.settings.patterns_db)
                if ledger is None and self.settings.costs_db.exists():
                    ledger = open_readonly(self.settings.costs_db)
                watch.samples.append(self._sample(now, journal, patterns, ledger))
            time.sleep(watch.interval_s)
        for conn in (journal, patterns, ledger):
            if conn is not None:
                conn.close()

    def mark(self, label: str) -> None:
        """A memory sample at the end of a phase, labelled (the main thread's own
        read-only connections: SQLite connections stay in their thread)."""
        conns = [open_readonly(db) for db in (self.settings.messages_db,
                                              self.settings.patterns_db, self.settings.costs_db)]
        try:
            self.marks.append((label, self._sample(time.monotonic(), *conns)))
        finally:
            for conn in conns:
                conn.close()

    def cpu_s(self) -> dict[str, float]:
        """Each agent's CPU time so far (user + system), seconds."""
        out = {}
        for name, proc in self.procs.items():
            times = psutil.Process(proc.pid).cpu_times()
            out[name] = times.user + times.system
        return out

    def _sample(self, now: float, journal: sqlite3.Connection,
                patterns: sqlite3.Connection | None,
                ledger: sqlite3.Connection | None) -> Sample:
        rss = {}
        for name, proc in self.procs.items():
            try:
                rss[name] = psutil.Process(proc.pid).memory_info().rss / 2**20
            except psutil.Error:
                rss[name] = float("nan")

        def count(conn: sqlite3.Connection | None, table: str) -> int:
            if conn is None:
                return 0
            try:
                return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            except sqlite3.Error:  # not created yet
                return 0

        files = [p for db in (self.settings.messages_db, self.settings.patterns_db,
                              self.settings.costs_db)
                 for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
        return Sample(now, rss, count(patterns, "exemplars"), count(journal, "messages"),
                      count(ledger, "calls"), sum(p.stat().st_size for p in files) / 2**20)

    # -- publishing --------------------------------------------------------------------

    def next_events(self, n: int) -> list[tuple[str, str, bytes]]:
        """(event_id, category, payload) of the next ``n`` scenario cycles, as the
        controller builds them."""
        out = []
        for _ in range(n):
            self.cycle += 1
            category, fields = event_for_cycle(self.cycle)
            event_id = f"{self.run.run_id}/c{self.cycle:06d}"
            out.append((event_id, category, encode_payload(
                {"event_id": event_id, "run_id": self.run.run_id, "cycle": self.cycle,
                 **fields})))
        return out

    def publish(self, events: list[tuple[str, str, bytes]]) -> float:
        """Journal ``events`` with their ``events`` rows in one transaction, send them;
        returns the monotonic time of the commit."""
        with self.journal.transaction() as tx:
            tx.publish_many(TELEMETRY, [(payload, event_id) for event_id, _, payload in events])
            stamp = int(time.time() * 1000)
            tx.conn.executemany(INSERT_EVENT, [(event_id, self.run.run_id, int(
                event_id.rsplit("/c", 1)[1]), category, stamp) for event_id, category, _ in events])
        committed = time.monotonic()
        self.sent_ms.update((event_id, stamp) for event_id, _, _ in events)
        self.node.send(tx.published)
        return committed

    def spans(self, ids: list[str]) -> dict[str, dict[str, float]]:
        """Per stage, p50/p99 of the time from its input to its output, from the stores'
        own stamps (ms): the event's commit here, the signal WITNESS journaled, the task
        ARCHITECT journaled, the outcome EXECUTOR recorded."""
        conn = open_readonly(self.settings.messages_db)
        try:
            stamps = dict(conn.execute(
                "SELECT msg_id, created_ms FROM messages WHERE stream IN (?, ?)",
                (IMPROVEMENT, EXECUTION)).fetchall())
            outcomes = dict(conn.execute(
                "SELECT event_id, recorded_ms FROM outcomes WHERE delegate != 'witness'"))
        finally:
            conn.close()
        gaps: dict[str, list[float]] = {name: [] for name in AGENTS}
        for event_id in ids:
            signal = stamps.get(message_id(IMPROVEMENT, event_id))
            task = stamps.get(message_id(EXECUTION, f"{event_id}/t1"))
            done = outcomes.get(event_id)
            if signal is None or task is None or done is None:
                continue
            for name, (lo, hi) in zip(AGENTS, ((self.sent_ms[event_id], signal), (signal, task),
                                              (task, done)), strict=True):
                gaps[name].append((hi - lo) / 1000)
        return {name: _ms(values) for name, values in gaps.items()}

    def wait_done(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = self.watch.seen
        while not all(i in seen for i in ids):
            self.check_alive()
            if time.monotonic() > deadline:
                missing = sum(i not in seen for i in ids)
                raise SystemExit(f"{missing} of {len(ids)} events without an outcome after "
                                 f"{timeout_s:.0f} s")
            time.sleep(0.01)


# -- phases ------------------------------------------------------------------------------


def journal_reference(data_dir: Path, n: int) -> dict[str, Any]:
    """The raw journal, one event per transaction, in this process, no agents running."""
    journal = Journal(data_dir / "reference_journal.db", source="reference")
    payloads = [encode_payload({"event_id": f"ref/{i}", **event_for_cycle(i + 1)[1]})
                for i in range(n)]
    times = []
    started = time.perf_counter()
    for i, payload in enumerate(payloads):
        t0 = time.perf_counter()
        with journal.transaction() as tx:
            tx.publish(TELEMETRY, payload, key=f"ref/{i}")
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    journal.close()
    return {"events": n, "commits_per_s": round(n / elapsed), **_ms(times)}


def paced(pipe: Pipeline, label: str, rate: float, n: int) -> dict[str, Any]:
    """``n`` events at ``rate`` per second, one per transaction; latency per event."""
    events = pipe.next_events(n)
    sent: dict[str, float] = {}
    lag = []
    start = time.monotonic() + 0.05
    for i, event in enumerate(events):
        due = start + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        sent[event[0]] = pipe.publish([event])
        lag.append(sent[event[0]] - due)
    ids = list(sent)
    pipe.wait_done(ids, timeout_s=60 + n / 50)
    seen = pipe.watch.seen
    full = [i for i in ids if seen[i][1] != "witness"]
    first, last = min(sent.values()), max(sent.values())
    done = max(seen[i][0] for i in ids)
    result = {
        "label": label, "offered_per_s": round(rate, 3), "events": n,
        "published_per_s": round((n - 1) / (last - first), 3) if n > 1 else None,
        "delivered_per_s": round(n / (done - first), 3),
        "full_path_events": len(full), "statuses": _statuses(seen, ids),
        "max_publish_lag_ms": round(1000 * max(lag), 2),
        **_ms([seen[i][0] - sent[i] for i in full]),
        "stage_spans": pipe.spans(full),
    }
    print(f"  {label:<30} {rate:>8.1f}/s x {n:>5}: p50 {result['p50_ms']:>7.2f} ms, "
          f"p99 {result['p99_ms']:>7.2f} ms, delivered {result['delivered_per_s']:.1f}/s; "
          "p50/p99 ms by stage: " + ", ".join(
              f"{k} {v['p50_ms']:g}/{v['p99_ms']:g}" for k, v in result["stage_spans"].items()),
          flush=True)
    return result


def _statuses(seen: dict[str, tuple[float, str, str]], ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in ids:
        key = f"{seen[i][1]}:{seen[i][2]}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def throughput(pipe: Pipeline, n: int) -> dict[str, Any]:
    """``n`` events as fast as the publisher goes; then each stage's pace from its cursor."""
    batches = [pipe.next_events(min(BATCH, n - lo)) for lo in range(0, n, BATCH)]
    ids = [e[0] for batch in batches for e in batch]
    watch = pipe.watch
    watch.interval_s = 0.02
    watch.cursors.clear()
    watch.sample_cursors = True
    time.sleep(0.1)
    base = dict(watch.cursors[-1][1]) if watch.cursors else {}
    exemplars_before = pipe.marks[-1][1].exemplars if pipe.marks else 0
    cache_before = pipe.witness_text_cache()
    cpu_before = pipe.cpu_s()
    started = time.monotonic()
    for batch in batches:
        pipe.publish(batch)
    published = time.monotonic()
    pipe.wait_done(ids, timeout_s=120 + n / 20)
    cpu_after = pipe.cpu_s()
    cache_after = pipe.witness_text_cache()
    watch.sample_cursors = False
    watch.interval_s = 0.001
    seen = watch.seen
    done = max(seen[i][0] for i in ids)
    stages = {}
    for name in AGENTS:
        start_at = base.get(name, 0)
        series = [(t, c[name]) for t, c in watch.cursors if name in c]
        end_at = series[-1][1] if series else start_at
        finished = next((t for t, c in series if c >= end_at), done)
        stages[name] = {"applied": end_at - start_at,
                        "finished_after_s": round(finished - started, 3),
                        "per_s": round((end_at - start_at) / max(finished - started, 1e-9))}
        # CPU per message it applied: with every core busy, the pipeline cannot go faster
        # than cores / (CPU per event summed over the stages).
        stages[name]["cpu_ms_per_message"] = round(
            1000 * (cpu_after[name] - cpu_before[name]) / max(end_at - start_at, 1), 3)
    cpu_per_event = sum(cpu_after[k] - cpu_before[k] for k in AGENTS) / n
    result = {"events": n, "exemplars_before": exemplars_before,
              "seconds": round(done - started, 3),
              "events_per_s": round(n / (done - started), 1),
              "publisher_per_s": round(n / (published - started)),
              "statuses": _statuses(seen, ids), "stages": stages,
              "agents_cpu_ms_per_event": round(1000 * cpu_per_event, 3),
              "witness_text_cache": {k: cache_after[k] - cache_before[k] for k in cache_after},
              "cpu_bound_events_per_s": round((os.cpu_count() or 1) / cpu_per_event)}
    print(f"  throughput: {n:,} events in {result['seconds']:.2f} s = "
          f"{result['events_per_s']:,.0f} events/s (publisher alone "
          f"{result['publisher_per_s']:,}/s); agents' CPU {result['agents_cpu_ms_per_event']} "
          f"ms per event (all {os.cpu_count()} cores busy: at most "
          f"{result['cpu_bound_events_per_s']:,} events/s); WITNESS's store held "
          f"{exemplars_before:,} exemplars at the start", flush=True)
    cache = result["witness_text_cache"]
    print(f"    WITNESS's text cache: {cache['hits']:,} events of a text seen lately, "
          f"{cache['misses']:,} worked out (the plan's scenario reuses its variants; "
          f"bench-witness and bench-witness-stream time texts not seen before)", flush=True)
    for name, stage in stages.items():
        print(f"    {name:<10} applied {stage['applied']:>6,} at {stage['per_s']:>6,}/s, done "
              f"{stage['finished_after_s']:>6.2f} s after the first publish, "
              f"{stage['cpu_ms_per_message']:.3f} ms CPU per message", flush=True)
    return result


def memory(samples: list[Sample], marks: list[tuple[str, Sample]]) -> dict[str, Any]:
    """RSS against store size: at the end of each phase, and the least-squares slope of
    the agents' total RSS over the exemplars WITNESS learned (every sample)."""
    def as_dict(s: Sample) -> dict[str, Any]:
        return {"rss_mb": {k: round(v, 1) for k, v in s.rss_mb.items()},
                "total_rss_mb": round(sum(s.rss_mb.values()), 1), "exemplars": s.exemplars,
                "journal_messages": s.journal_messages, "ledger_calls": s.ledger_calls,
                "store_files_mb": round(s.store_mb, 1)}

    xs = [float(s.exemplars) for s in samples]
    ys = [sum(s.rss_mb.values()) for s in samples]
    slope = None
    if len(samples) > 2 and max(xs) - min(xs) >= SLOPE_SPAN:
        slope = statistics.linear_regression(xs, ys).slope * 1000
    return {"after_phase": {label: as_dict(s) for label, s in marks},
            "peak_total_rss_mb": round(max(ys), 1),
            "mb_per_1000_exemplars": None if slope is None else round(slope, 3),
            "samples": len(samples)}


# -- report ------------------------------------------------------------------------------


def build_rows(ref: dict[str, Any], tiers: list[dict[str, Any]], thr: dict[str, Any],
               mem: dict[str, Any]) -> list[dict[str, Any]]:
    commit_rate = ("raw journal: one event per transaction", ref["commits_per_s"], "commits/s")
    commit_p99 = ("raw journal: p99 of one commit", ref["p99_ms"], "ms")
    rows = [figure("pipeline: events/s end to end", thr["events_per_s"], "events/s",
                   reference=commit_rate,
                   target=f">= {TARGET_EVENTS_PER_S:,.0f} events/s",
                   met=thr["events_per_s"] >= TARGET_EVENTS_PER_S)]
    witness = thr["stages"]["witness"]
    rows.append(figure(f"pipeline: WITNESS CPU per event at {thr['exemplars_before']:,} "
                       "exemplars (throughput phase)", witness["cpu_ms_per_message"], "ms",
                       reference=("all three agents' CPU per event",
                                  thr["agents_cpu_ms_per_event"], "ms"),
                       target=f"<= {TARGET_WITNESS_CPU_MS:g} ms",
                       met=witness["cpu_ms_per_message"] <= TARGET_WITNESS_CPU_MS))
    for tier in tiers:
        at = f"at {tier['label']} ({tier['offered_per_s']:g} events/s)"
        is_target = tier["offered_per_s"] == LATENCY_RATE
        rows.append(figure(f"pipeline: p99 event-to-outcome {at}", tier["p99_ms"], "ms",
                           reference=commit_p99,
                           target=f"<= {TARGET_P99_MS:g} ms" if is_target else None,
                           met=tier["p99_ms"] <= TARGET_P99_MS if is_target else None))
        rows.append(figure(f"pipeline: delivered {at}", tier["delivered_per_s"], "events/s",
                           reference=("offered", tier["offered_per_s"], "events/s")))
    for label, at in mem["after_phase"].items():
        rows.append(figure(f"pipeline: agents' RSS after {label} ({at['exemplars']:,} "
                           f"exemplars, {at['journal_messages']:,} journal msgs, "
                           f"{at['store_files_mb']:g} MB stores)", at["total_rss_mb"], "MB"))
    if mem["mb_per_1000_exemplars"] is not None:
        rows.append(figure("pipeline: agents' RSS growth per 1,000 exemplars learned",
                           mem["mb_per_1000_exemplars"], "MB"))
    return rows


TARGET_NAMES = {
    "events": f">= {TARGET_EVENTS_PER_S:,.0f} events/s end to end",
    "latency": f"p99 <= {TARGET_P99_MS:g} ms at {LATENCY_RATE:g} events/s",
    "witness": f"WITNESS <= {TARGET_WITNESS_CPU_MS:g} ms CPU per event at "
               f"{EXEMPLARS:,} exemplars",
}


def target_verdicts(tiers: list[dict[str, Any]], thr: dict[str, Any]) -> dict[str, bool]:
    """Each target (``TARGET_NAMES``): met or not."""
    at_rate = [t for t in tiers if t["offered_per_s"] == LATENCY_RATE]
    return {"events": thr["events_per_s"] >= TARGET_EVENTS_PER_S,
            "latency": bool(at_rate) and all(t["p99_ms"] <= TARGET_P99_MS for t in at_rate),
            "witness": thr["stages"]["witness"]["cpu_ms_per_message"] <= TARGET_WITNESS_CPU_MS
                       and thr["exemplars_before"] >= EXEMPLARS}


def gates(spec: str) -> set[str]:
    """The targets whose miss fails the run: ``BENCH_GATE`` names some (comma-separated
    keys of ``TARGET_NAMES``); empty or unset, all of them."""
    keys = {k.strip() for k in spec.split(",") if k.strip()}
    unknown = keys - set(TARGET_NAMES)
    if unknown:
        raise SystemExit(f"BENCH_GATE: unknown target(s) {sorted(unknown)}; "
                         f"known: {', '.join(TARGET_NAMES)}")
    return keys or set(TARGET_NAMES)


def print_profiles(profile_dir: Path) -> None:
    import pstats

    for name in AGENTS:
        path = profile_dir / f"{name}.prof"
        if path.exists():
            print(f"\n--- {name}: top functions by own time ({path}) ---")
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", choices=AGENTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    profile = os.environ.get("BENCH_PROFILE")
    profile_dir = Path(profile).resolve() if profile else None
    if args.agent:
        assert profile_dir is not None
        return run_agent(args.agent, profile_dir)
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    short = os.environ.get("BENCH_SHORT", "") not in ("", "0")
    n = int(os.environ.get("BENCH_N") or (5_000 if short else 20_000))
    # (label, rate, seconds at that rate, at least this many events)
    tiers = [("1x plan rate", PLAN_RATE, 20 if short else 60, 30),
             ("10x plan rate", 10 * PLAN_RATE, 15 if short else 30, 200),
             ("100x plan rate", 100 * PLAN_RATE, 10 if short else 20, 1000),
             ("the latency target load", LATENCY_RATE, 10 if short else 30, 2000)]
    print(f"bench-pipeline: WITNESS -> ARCHITECT -> EXECUTOR -> outcome, instant model "
          f"provider; plan rate {PLAN_RATE:g} events/s (1 per 30 sim min at time scale "
          f"{TIME_SCALE:g}); throughput N={n:,}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    exemplars = int(os.environ.get("BENCH_EXEMPLARS") or EXEMPLARS)
    pipe = Pipeline(profile_dir)
    try:
        started = time.monotonic()
        count = pipe.fill_patterns(exemplars)
        print(f"  pattern store: {count:,} exemplars (dev set + recombined messages) in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        ref = journal_reference(pipe.data_dir, 1000 if short else 3000)
        print(f"  reference: raw journal {ref['commits_per_s']:,} commits/s, one commit "
              f"p50 {ref['p50_ms']} ms p99 {ref['p99_ms']} ms", flush=True)
        started = time.monotonic()
        pipe.start()
        print(f"  agents beating after {time.monotonic() - started:.1f} s", flush=True)
        warm = pipe.next_events(20)
        for event in warm:
            pipe.publish([event])
            time.sleep(0.02)
        pipe.wait_done([e[0] for e in warm], timeout_s=60)
        pipe.mark("warm-up")
        results = []
        for label, rate, seconds, least in tiers:
            results.append(paced(pipe, label, rate, max(int(rate * seconds), least)))
            pipe.mark(label)
        thr = throughput(pipe, n)
        pipe.mark("throughput")
        mem = memory(pipe.watch.samples, pipe.marks)
    finally:
        pipe.stop()
    rows = build_rows(ref, results, thr, mem)
    print("\n" + format_table(rows))
    growth = (f"growth {mem['mb_per_1000_exemplars']} MB per 1,000 exemplars"
              if mem["mb_per_1000_exemplars"] is not None else
              f"growth per exemplar not fitted: fewer than {SLOPE_SPAN:,} learned")
    print(f"\nRSS (MB) against store size, after each phase ({growth}):")
    for label, at in mem["after_phase"].items():
        print(f"  {label:<26} {at['exemplars']:>7,} exemplars {at['journal_messages']:>7,} "
              f"journal msgs {at['ledger_calls']:>7,} ledger rows {at['store_files_mb']:>6.1f} "
              f"MB files: " + ", ".join(f"{k} {v:.1f}" for k, v in at["rss_mb"].items()))
    verdicts = target_verdicts(results, thr)
    gated = gates(os.environ.get("BENCH_GATE", ""))
    for key, met in verdicts.items():
        if not met:
            print(f"target missed: {TARGET_NAMES[key]}"
                  + ("" if key in gated else " (not gated: BENCH_GATE leaves it out)"))
    ok = all(verdicts[key] for key in gated)
    write_report(REPORT, {
        "cpus": os.cpu_count(), "load_avg_after": round(os.getloadavg()[0], 2),
        "time_scale": TIME_SCALE, "plan_rate_per_s": PLAN_RATE, "reference": ref,
        "paced": results, "throughput": thr, "memory": mem,
        "targets": {"events_per_s": TARGET_EVENTS_PER_S, "p99_ms_at_200_per_s": TARGET_P99_MS,
                    "witness_cpu_ms_per_event": TARGET_WITNESS_CPU_MS},
        "verdicts": verdicts, "gated": sorted(gated), "target_met": ok}, rows)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    if profile_dir is not None:
        print_profiles(profile_dir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
