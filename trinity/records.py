"""What a run records beside the bus: runs, the events the controller emitted, outcomes.

These tables live in the journal database so that an agent records its outcome
in the same transaction that advances its cursor: exactly once, by construction.
"""

from __future__ import annotations

import json
import sqlite3

from trinity.db import immediate

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs ("
    " run_id TEXT PRIMARY KEY, started_ms INTEGER NOT NULL, ended_ms INTEGER,"
    " status TEXT NOT NULL, config TEXT NOT NULL, sim_elapsed_s REAL NOT NULL DEFAULT 0)",
    # noise = 0: the cycle's scheduled event; 1..n: the noise events emitted with it.
    "CREATE TABLE IF NOT EXISTS events ("
    " event_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, cycle INTEGER NOT NULL,"
    " noise INTEGER NOT NULL DEFAULT 0, category TEXT NOT NULL, emitted_ms INTEGER NOT NULL,"
    " sim_elapsed_s REAL NOT NULL, UNIQUE (run_id, cycle, noise))",
    "CREATE TABLE IF NOT EXISTS outcomes ("
    " task_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, run_id TEXT,"
    " delegate TEXT NOT NULL, status TEXT NOT NULL, recorded_ms INTEGER NOT NULL,"
    " product TEXT)",
    "CREATE INDEX IF NOT EXISTS outcomes_event ON outcomes(event_id)",
    # One row per snapshot file written (kind: costs, patterns, metrics; idx: its
    # position in the schedule), so a restarted controller neither repeats nor skips one.
    "CREATE TABLE IF NOT EXISTS snapshots ("
    " run_id TEXT NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL,"
    " sim_elapsed_s REAL NOT NULL, path TEXT NOT NULL, written_ms INTEGER NOT NULL,"
    " PRIMARY KEY (run_id, kind, idx))",
)


def ensure_schema(conn: sqlite3.Connection) -> None:
    with immediate(conn):
        for ddl in SCHEMA:
            conn.execute(ddl)


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
