"""Runs: a run id, its configuration, its status and its simulated-time checkpoint.

``trinity run`` creates a run (or reactivates the latest with ``--resume``); the
controller process only ever continues the active run, so a controller restarted
by supervisord picks up where it stopped and never starts a new run by itself.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from trinity import records
from trinity.clock import now_ms
from trinity.db import immediate
from trinity.errors import ConfigError

ACTIVE = "active"
COMPLETED = "completed"
TIMED_OUT = "timed_out"
STOPPED = "stopped"


@dataclass(frozen=True)
class Run:
    run_id: str
    started_ms: int
    status: str
    config: dict[str, Any]
    sim_elapsed_s: float

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


def budget_usd(run: Run, default: float) -> float:
    """The run's budget (``trinity run --budget`` / TRINITY_TEST_BUDGET at its start)."""
    return float(run.config.get("budget_usd", default))


def _row_to_run(row: tuple[Any, ...]) -> Run:
    run_id, started, status, config, sim = row
    return Run(run_id, int(started), status, json.loads(config), float(sim))


def _write(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    with immediate(conn):
        conn.execute(sql, params)


def create_run(conn: sqlite3.Connection, config: dict[str, Any]) -> Run:
    records.ensure_schema(conn)
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
    records.ensure_schema(conn)
    return latest_run_readonly(conn)


def latest_run_readonly(conn: sqlite3.Connection) -> Run | None:
    """The most recently started run, on a connection that may not write."""
    row = conn.execute(
        "SELECT run_id, started_ms, status, config, sim_elapsed_s FROM runs"
        " ORDER BY started_ms DESC, rowid DESC LIMIT 1"
    ).fetchone()
    return _row_to_run(row) if row else None


def active_run(conn: sqlite3.Connection) -> Run | None:
    row = conn.execute(
        "SELECT run_id, started_ms, status, config, sim_elapsed_s FROM runs WHERE status=?"
        " ORDER BY started_ms DESC LIMIT 1",
        (ACTIVE,),
    ).fetchone()
    return _row_to_run(row) if row else None


def resume_run(conn: sqlite3.Connection) -> Run:
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
    row = conn.execute(
        "SELECT run_id, started_ms, status, config, sim_elapsed_s FROM runs WHERE run_id=?",
        (run_id,),
    ).fetchone()
    return _row_to_run(row) if row else None


def progress(conn: sqlite3.Connection, run_id: str) -> dict[str, int]:
    """Events emitted, and events with at least one recorded outcome, for a run."""
    emitted = conn.execute("SELECT count(*) FROM events WHERE run_id=?", (run_id,)).fetchone()[0]
    done = conn.execute(
        "SELECT count(DISTINCT o.event_id) FROM outcomes o JOIN events e USING(event_id)"
        " WHERE e.run_id=?",
        (run_id,),
    ).fetchone()[0]
    last = conn.execute("SELECT max(cycle) FROM events WHERE run_id=? AND noise=0",
                        (run_id,)).fetchone()[0]
    return {"emitted": int(emitted), "completed": int(done), "last_cycle": int(last or 0)}
