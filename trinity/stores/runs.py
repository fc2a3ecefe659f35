"""The run store: what a run records beside the bus, in the journal's file.

``runs`` (a run id, its configuration, status and simulated-time checkpoint), the
``events`` the controller emitted (with their ground truth), the ``outcomes`` they ended
in, the ``snapshots`` written, the ``agents``' last heartbeats, and ``emitted_events``
(the ids ``trinity emit`` journaled). The tables live in ``trinity_messages.db`` so that
an agent records its outcome in the same transaction that advances its cursor: exactly
once, by construction.

``trinity run`` creates a run (or reactivates the latest with ``--resume``); the
controller process only ever continues the active run, so a controller restarted by
supervisord picks up where it stopped and never starts a new run by itself.

Writers pass their open write connection (a journal transaction's); readers pass a
read-only one (:func:`trinity.db.reading`).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from trinity.clock import now_ms
from trinity.db import create_schema, immediate
from trinity.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import MetaData

ACTIVE = "active"
COMPLETED = "completed"
TIMED_OUT = "timed_out"
STOPPED = "stopped"


def declare(metadata: MetaData) -> None:
    """The run store's tables (SQLAlchemy Core; see ``trinity.stores.schema``)."""
    from sqlalchemy import (
        Column,
        Float,
        Index,
        Integer,
        PrimaryKeyConstraint,
        Table,
        Text,
        UniqueConstraint,
        text,
    )

    Table("runs", metadata,
          Column("run_id", Text, primary_key=True),
          Column("started_ms", Integer, nullable=False),
          Column("ended_ms", Integer),
          Column("status", Text, nullable=False),
          Column("config", Text, nullable=False),
          Column("sim_elapsed_s", Float, nullable=False, server_default=text("0")))
    # noise = 0: the cycle's scheduled event; 1..n: the noise events emitted with it.
    Table("events", metadata,
          Column("event_id", Text, primary_key=True),
          Column("run_id", Text, nullable=False),
          Column("cycle", Integer, nullable=False),
          Column("noise", Integer, nullable=False, server_default=text("0")),
          Column("category", Text, nullable=False),
          Column("emitted_ms", Integer, nullable=False),
          Column("sim_elapsed_s", Float, nullable=False),
          UniqueConstraint("run_id", "cycle", "noise"))
    outcomes = Table("outcomes", metadata,
                     Column("task_id", Text, primary_key=True),
                     Column("event_id", Text, nullable=False),
                     Column("run_id", Text),
                     Column("delegate", Text, nullable=False),
                     Column("status", Text, nullable=False),
                     Column("recorded_ms", Integer, nullable=False),
                     Column("product", Text))
    Index("outcomes_event", outcomes.c.event_id)
    # One row per snapshot file written (kind: costs, patterns, metrics; idx: its
    # position in the schedule), so a restarted controller neither repeats nor skips one.
    Table("snapshots", metadata,
          Column("run_id", Text, nullable=False),
          Column("kind", Text, nullable=False),
          Column("idx", Integer, nullable=False),
          Column("sim_elapsed_s", Float, nullable=False),
          Column("path", Text, nullable=False),
          Column("written_ms", Integer, nullable=False),
          PrimaryKeyConstraint("run_id", "kind", "idx"))
    # Each agent's last heartbeat as the controller received it.
    Table("agents", metadata,
          Column("name", Text, primary_key=True),
          Column("pid", Integer),
          Column("last_heartbeat_ms", Integer, nullable=False),
          Column("heartbeat", Text, nullable=False))
    # The event ids `trinity emit` journaled: they outlive the pruning of applied messages.
    # run_id: the run that was active when the event arrived (NULL: none was), so every
    # view of that run shows it, marked external; sim_elapsed_s: the run's simulated
    # time then.
    emitted = Table("emitted_events", metadata,
                    Column("event_id", Text, primary_key=True),
                    Column("msg_id", Text, nullable=False),
                    Column("emitted_ms", Integer, nullable=False),
                    Column("run_id", Text),
                    Column("sim_elapsed_s", Float),
                    sqlite_with_rowid=False)
    Index("emitted_events_run", emitted.c.run_id)


# -- schema: generated from declare() by `make schema`; a test keeps it current --
DDL = (
    "CREATE TABLE IF NOT EXISTS runs (run_id TEXT NOT NULL, started_ms INTEGER NOT "
    "NULL, ended_ms INTEGER, status TEXT NOT NULL, config TEXT NOT NULL, sim_elapsed_s "
    "FLOAT DEFAULT 0 NOT NULL, PRIMARY KEY (run_id))",
    "CREATE TABLE IF NOT EXISTS events (event_id TEXT NOT NULL, run_id TEXT NOT NULL, "
    "cycle INTEGER NOT NULL, noise INTEGER DEFAULT 0 NOT NULL, category TEXT NOT NULL, "
    "emitted_ms INTEGER NOT NULL, sim_elapsed_s FLOAT NOT NULL, PRIMARY KEY (event_id), "
    "UNIQUE (run_id, cycle, noise))",
    "CREATE TABLE IF NOT EXISTS outcomes (task_id TEXT NOT NULL, event_id TEXT NOT "
    "NULL, run_id TEXT, delegate TEXT NOT NULL, status TEXT NOT NULL, recorded_ms "
    "INTEGER NOT NULL, product TEXT, PRIMARY KEY (task_id))",
    "CREATE INDEX IF NOT EXISTS outcomes_event ON outcomes (event_id)",
    "CREATE TABLE IF NOT EXISTS snapshots (run_id TEXT NOT NULL, kind TEXT NOT NULL, "
    "idx INTEGER NOT NULL, sim_elapsed_s FLOAT NOT NULL, path TEXT NOT NULL, written_ms "
    "INTEGER NOT NULL, PRIMARY KEY (run_id, kind, idx))",
    "CREATE TABLE IF NOT EXISTS agents (name TEXT NOT NULL, pid INTEGER, "
    "last_heartbeat_ms INTEGER NOT NULL, heartbeat TEXT NOT NULL, PRIMARY KEY (name))",
    "CREATE TABLE IF NOT EXISTS emitted_events (event_id TEXT NOT NULL, msg_id TEXT NOT "
    "NULL, emitted_ms INTEGER NOT NULL, run_id TEXT, sim_elapsed_s FLOAT, PRIMARY KEY "
    "(event_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS emitted_events_run ON emitted_events (run_id)",
)
# Each table's columns: a store made before one existed gets it on open.
COLUMNS = {
    "runs": (
        "run_id TEXT NOT NULL",
        "started_ms INTEGER NOT NULL",
        "ended_ms INTEGER",
        "status TEXT NOT NULL",
        "config TEXT NOT NULL",
        "sim_elapsed_s FLOAT DEFAULT 0 NOT NULL",
    ),
    "events": (
        "event_id TEXT NOT NULL",
        "run_id TEXT NOT NULL",
        "cycle INTEGER NOT NULL",
        "noise INTEGER DEFAULT 0 NOT NULL",
        "category TEXT NOT NULL",
        "emitted_ms INTEGER NOT NULL",
        "sim_elapsed_s FLOAT NOT NULL",
    ),
    "outcomes": (
        "task_id TEXT NOT NULL",
        "event_id TEXT NOT NULL",
        "run_id TEXT",
        "delegate TEXT NOT NULL",
        "status TEXT NOT NULL",
        "recorded_ms INTEGER NOT NULL",
        "product TEXT",
    ),
    "snapshots": (
        "run_id TEXT NOT NULL",
        "kind TEXT NOT NULL",
        "idx INTEGER NOT NULL",
        "sim_elapsed_s FLOAT NOT NULL",
        "path TEXT NOT NULL",
        "written_ms INTEGER NOT NULL",
    ),
    "agents": (
        "name TEXT NOT NULL",
        "pid INTEGER",
        "last_heartbeat_ms INTEGER NOT NULL",
        "heartbeat TEXT NOT NULL",
    ),
    "emitted_events": (
        "event_id TEXT NOT NULL",
        "msg_id TEXT NOT NULL",
        "emitted_ms INTEGER NOT NULL",
        "run_id TEXT",
        "sim_elapsed_s FLOAT",
    ),
}
# -- end of generated schema --


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing: tables, indexes, columns a store made earlier lacks."""
    with immediate(conn):
        create_schema(conn, DDL, COLUMNS)


def has_schema(conn: sqlite3.Connection, table: str = "runs") -> bool:
    """Whether the file holds the run store's ``table`` yet (a journal no run has used, or
    one just created by a process that has not reached ``ensure_schema``, does not)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                        (table,)).fetchone() is not None


def _records_external(conn: sqlite3.Connection) -> bool:
    """Whether the store records which run an external event arrived in: a store written
    by earlier code and only read since (reports, export) has no such column."""
    return any(row[1] == "run_id" for row in conn.execute(
        "PRAGMA table_info(emitted_events)"))


# -- runs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    run_id: str
    started_ms: int
    status: str
    config: dict[str, Any]
    sim_elapsed_s: float
    ended_ms: int | None = None

    @property
    def time_scale(self) -> float:
        return float(self.config["time_scale"])

    @property
    def duration_s(self) -> float:
        return float(self.config["duration_h"]) * 3600

    @property
    def event_interval_s(self) -> float:
        return float(self.config["event_interval_min"]) * 60

    @property
    def total_cycles(self) -> int:
        return int(self.duration_s // self.event_interval_s)

    @property
    def noise_events(self) -> int:
        """Noise events (none of the five patterns) emitted with each cycle's event."""
        return int(self.config.get("noise_events", 0))

    @property
    def total_events(self) -> int:
        return self.total_cycles * (1 + self.noise_events)

    @property
    def scenario_seed(self) -> int:
        return int(self.config.get("scenario_seed", 0))

    def interval_s(self, kind: str) -> float:
        """Simulated seconds between snapshots of ``kind`` (costs, patterns, metrics)."""
        key = "metrics_interval_min" if kind == "metrics" else "snapshot_interval_min"
        return float(self.config.get(key, 5.0 if kind == "metrics" else 60.0)) * 60

    def budget(self, default: float) -> tuple[float, str]:
        """(budget_usd, budget_mode) the run was started with (``trinity run --budget``,
        TRINITY_TEST_BUDGET at its start), else ``default`` and warn."""
        try:
            return (float(self.config.get("budget_usd", default)),
                    str(self.config.get("budget_mode", "warn")))
        except (TypeError, ValueError):
            return default, "warn"


def budget_usd(run: Run, default: float) -> float:
    """The run's budget (``trinity run --budget`` / TRINITY_TEST_BUDGET at its start)."""
    return run.budget(default)[0]


_RUN_COLUMNS = "run_id, started_ms, status, config, sim_elapsed_s, ended_ms"


def _row_to_run(row: tuple[Any, ...]) -> Run:
    run_id, started, status, config, sim, ended = row
    return Run(run_id, int(started), status, json.loads(config), float(sim),
               None if ended is None else int(ended))


def _write(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    with immediate(conn):
        conn.execute(sql, params)


def create_run(conn: sqlite3.Connection, config: dict[str, Any]) -> Run:
    ensure_schema(conn)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}-{secrets.token_hex(2)}"
    with immediate(conn):
        conn.execute("UPDATE runs SET status=? WHERE status=?", (STOPPED, ACTIVE))
        conn.execute(
            "INSERT INTO runs(run_id, started_ms, status, config, sim_elapsed_s)"
            " VALUES (?, ?, ?, ?, 0)",
            (run_id, now_ms(), ACTIVE, json.dumps(config, sort_keys=True)),
        )
    run = active_run(conn)
    assert run is not None
    return run


def latest_run(conn: sqlite3.Connection) -> Run | None:
    """The most recently started run (None before the first, or before the tables exist)."""
    if not has_schema(conn):
        return None
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started_ms DESC, rowid DESC LIMIT 1"
    ).fetchone()
    return _row_to_run(row) if row else None


def all_runs(conn: sqlite3.Connection) -> list[Run]:
    """Every run, the most recently started first."""
    if not has_schema(conn):
        return []
    return [_row_to_run(row) for row in conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started_ms DESC, rowid DESC")]


def active_run(conn: sqlite3.Connection) -> Run | None:
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE status=? ORDER BY started_ms DESC LIMIT 1",
        (ACTIVE,),
    ).fetchone()
    return _row_to_run(row) if row else None


def resume_run(conn: sqlite3.Connection) -> Run:
    ensure_schema(conn)
    run = latest_run(conn)
    if run is None:
        raise ConfigError("--resume: there is no earlier run to resume")
    if run.status in (COMPLETED, TIMED_OUT):
        raise ConfigError(f"--resume: run {run.run_id} already ended ({run.status})")
    _write(conn, "UPDATE runs SET status=? WHERE run_id=?", (ACTIVE, run.run_id))
    resumed = active_run(conn)
    assert resumed is not None
    return resumed


def checkpoint(conn: sqlite3.Connection, run_id: str, sim_elapsed_s: float) -> None:
    _write(conn, "UPDATE runs SET sim_elapsed_s=? WHERE run_id=? AND sim_elapsed_s<?",
           (sim_elapsed_s, run_id, sim_elapsed_s))


def finish(conn: sqlite3.Connection, run_id: str, status: str) -> None:
    _write(conn, "UPDATE runs SET status=?, ended_ms=? WHERE run_id=?", (status, now_ms(), run_id))


def get_run(conn: sqlite3.Connection, run_id: str) -> Run | None:
    if not has_schema(conn):
        return None
    row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id=?", (run_id,)).fetchone()
    return _row_to_run(row) if row else None


def sim_elapsed_s(conn: sqlite3.Connection, run_id: str | None) -> float | None:
    """The run's simulated time at its latest checkpoint (the controller writes one
    every half second of real time), or None for an unknown run."""
    if run_id is None:
        return None
    row = conn.execute("SELECT sim_elapsed_s FROM runs WHERE run_id=?", (run_id,)).fetchone()
    return float(row[0]) if row else None


def run_budget(conn: sqlite3.Connection, run_id: str | None) -> tuple[float, str] | None:
    """(budget_usd, budget_mode) the run was started with, or None if it recorded none."""
    if run_id is None:
        return None
    row = conn.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
    if not row:
        return None
    try:
        config = json.loads(row[0])
        return float(config["budget_usd"]), str(config.get("budget_mode", "warn"))
    except (ValueError, KeyError, TypeError):
        return None


def progress(conn: sqlite3.Connection, run_id: str) -> dict[str, int]:
    """Events emitted, and events with at least one recorded outcome, for a run; the
    same for the external events that arrived during it (``external``,
    ``external_completed``)."""
    emitted = conn.execute("SELECT count(*) FROM events WHERE run_id=?", (run_id,)).fetchone()[0]
    done = conn.execute(
        "SELECT count(DISTINCT o.event_id) FROM outcomes o JOIN events e USING(event_id)"
        " WHERE e.run_id=?",
        (run_id,),
    ).fetchone()[0]
    last = conn.execute("SELECT max(cycle) FROM events WHERE run_id=? AND noise=0",
                        (run_id,)).fetchone()[0]
    external, external_done = conn.execute(
        "SELECT count(DISTINCT x.event_id), count(DISTINCT o.event_id) FROM emitted_events x"
        " LEFT JOIN outcomes o USING(event_id) WHERE x.run_id=?", (run_id,)
    ).fetchone() if _records_external(conn) else (0, 0)
    return {"emitted": int(emitted), "completed": int(done), "last_cycle": int(last or 0),
            "external": int(external), "external_completed": int(external_done)}


# -- events and outcomes ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event:
    """One event the controller emitted, with the ground truth it recorded beside it."""

    event_id: str
    cycle: int
    noise: int
    category: str
    emitted_ms: int
    sim_elapsed_s: float


@dataclass(frozen=True, slots=True)
class Outcome:
    task_id: str
    event_id: str
    delegate: str
    status: str
    recorded_ms: int
    external: bool = False  # the outcome of an external event (``trinity emit``)


def record_event(conn: sqlite3.Connection, run_id: str, event: Event) -> None:
    """Record an emitted event (once: a cycle re-emitted after a crash changes nothing)."""
    conn.execute(
        "INSERT OR IGNORE INTO events(event_id, run_id, cycle, noise, category, emitted_ms,"
        " sim_elapsed_s) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (event.event_id, run_id, event.cycle, event.noise, event.category, event.emitted_ms,
         event.sim_elapsed_s))


def events(conn: sqlite3.Connection, run_id: str) -> list[Event]:
    """The run's events in the order they were emitted."""
    return [Event(e, int(c), int(n), cat, int(ms), float(sim)) for e, c, n, cat, ms, sim in
            conn.execute("SELECT event_id, cycle, noise, category, emitted_ms, sim_elapsed_s"
                         " FROM events WHERE run_id=? ORDER BY sim_elapsed_s, cycle, noise",
                         (run_id,))]


def record_outcome(conn: sqlite3.Connection, *, task_id: str, event_id: str,
                   run_id: str | None, delegate: str, status: str,
                   product: str | None) -> None:
    """Record what an event (or one of its tasks) ended in, in the writer's transaction."""
    conn.execute(
        "INSERT INTO outcomes(task_id, event_id, run_id, delegate, status, recorded_ms, product)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (task_id, event_id, run_id, delegate, status, now_ms(), product))


# The run's events: the controller's and the external ones that arrived during it.
_PLAN_EVENTS = "SELECT event_id, 0 AS external FROM events WHERE run_id=?"
_RUN_EVENTS = f"{_PLAN_EVENTS} UNION ALL SELECT event_id, 1 FROM emitted_events WHERE run_id=?"


def outcomes(conn: sqlite3.Connection, run_id: str) -> list[Outcome]:
    """The outcomes recorded for the run's events (external ones included), in the order
    they were recorded."""
    events = _RUN_EVENTS if _records_external(conn) else _PLAN_EVENTS
    return [Outcome(t, e, d, s, int(ms), bool(x)) for t, e, d, s, ms, x in conn.execute(
        "SELECT o.task_id, o.event_id, o.delegate, o.status, o.recorded_ms, r.external"
        f" FROM outcomes o JOIN ({events}) r USING(event_id)"
        " ORDER BY o.recorded_ms, o.rowid", (run_id,) * events.count("?"))]


def failure_reason(product: str | None, limit: int = 200) -> str:
    """Why an outcome failed, from what it recorded (EXECUTOR's ``{"error": ...}``,
    ARCHITECT's text): one line of at most ``limit`` characters."""
    text = product or ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        text = body["error"]
    text = " ".join(text.split()) or "no reason recorded"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def outcome_product(conn: sqlite3.Connection, task_id: str) -> str | None:
    """What an outcome recorded as its product (a work product, a reason), if any."""
    row = conn.execute("SELECT product FROM outcomes WHERE task_id=?", (task_id,)).fetchone()
    return None if row is None else row[0]


def already_emitted(conn: sqlite3.Connection, event_ids: Sequence[str]) -> set[str]:
    """Which of ``event_ids`` ``trinity emit`` or the controller journaled before (both
    records outlive the pruning of applied messages)."""
    found: set[str] = set()
    for chunk in _chunks(event_ids):
        marks = ",".join("?" * len(chunk))
        for table in ("emitted_events", "events"):
            found.update(row[0] for row in conn.execute(
                f"SELECT event_id FROM {table} WHERE event_id IN ({marks})", chunk))
    return found


def record_emitted(conn: sqlite3.Connection, rows: Iterable[tuple[str, str]],
                   run: Run | None = None) -> None:
    """(event_id, msg_id) of events ``trinity emit`` journaled, in its transaction;
    ``run`` is the run they arrived in (the active one), if any."""
    ts = now_ms()
    run_id = run.run_id if run else None
    sim = sim_elapsed_s(conn, run_id)
    conn.executemany("INSERT INTO emitted_events(event_id, msg_id, emitted_ms, run_id,"
                     " sim_elapsed_s) VALUES (?, ?, ?, ?, ?)",
                     [(event_id, msg_id, ts, run_id, sim) for event_id, msg_id in rows])


@dataclass(frozen=True, slots=True)
class ExternalEvent:
    """An event ``trinity emit`` journaled while a run was active: part of that run, with
    no ground truth (nobody said what it is)."""

    event_id: str
    emitted_ms: int
    sim_elapsed_s: float


def external_events(conn: sqlite3.Connection, run_id: str) -> list[ExternalEvent]:
    """The external events that arrived during the run, in the order they arrived."""
    if not _records_external(conn):
        return []
    return [ExternalEvent(e, int(ms), float(sim or 0.0)) for e, ms, sim in conn.execute(
        "SELECT event_id, emitted_ms, sim_elapsed_s FROM emitted_events WHERE run_id=?"
        " ORDER BY emitted_ms, event_id", (run_id,))]


def _chunks(items: Sequence[str], size: int = 900) -> Iterator[Sequence[str]]:
    for lo in range(0, len(items), size):
        yield items[lo:lo + size]


# -- snapshots written --------------------------------------------------------------------

def record_snapshot(conn: sqlite3.Connection, run_id: str, kind: str, idx: int,
                    sim_elapsed_s: float, path: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO snapshots(run_id, kind, idx, sim_elapsed_s, path, written_ms)"
        " VALUES (?, ?, ?, ?, ?, ?)", (run_id, kind, idx, sim_elapsed_s, path, now_ms()))


def snapshots_written(conn: sqlite3.Connection, run_id: str) -> dict[str, list[str]]:
    """The paths of the snapshot files written for the run, by kind, in schedule order."""
    found: dict[str, list[str]] = {}
    for kind, path in conn.execute(
            "SELECT kind, path FROM snapshots WHERE run_id=? ORDER BY kind, idx", (run_id,)):
        found.setdefault(str(kind), []).append(str(path))
    return found


def next_snapshots(conn: sqlite3.Connection, run_id: str) -> dict[str, int]:
    """Per kind, the schedule position of the next snapshot to write."""
    return {str(kind): int(last) + 1 for kind, last in conn.execute(
        "SELECT kind, max(idx) FROM snapshots WHERE run_id=? GROUP BY kind", (run_id,))}


# -- agents' heartbeats ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Heartbeat:
    agent: str
    pid: int | None
    last_ms: int


def record_heartbeat(conn: sqlite3.Connection, agent: str, pid: int | None,
                     heartbeat: str) -> None:
    conn.execute(
        "INSERT INTO agents(name, pid, last_heartbeat_ms, heartbeat) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(name) DO UPDATE SET pid=excluded.pid,"
        " last_heartbeat_ms=excluded.last_heartbeat_ms, heartbeat=excluded.heartbeat",
        (agent, pid, now_ms(), heartbeat))


def heartbeats(conn: sqlite3.Connection) -> list[Heartbeat]:
    """Each agent's last heartbeat the controller recorded, by name."""
    if not has_schema(conn, "agents"):
        return []
    return [Heartbeat(name, None if pid is None else int(pid), int(ms)) for name, pid, ms in
            conn.execute("SELECT name, pid, last_heartbeat_ms FROM agents ORDER BY name")]
