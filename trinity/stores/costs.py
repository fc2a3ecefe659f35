"""The cost ledger (``trinity_costs.db``): one row per model call attempt.

Every attempt is a row — the answer, the error, the timeout, the retry, the
fallback — with its own ``call_id``, so totals never count a call twice. Attempts
that serve one request share a ``request_id``; a successful answer is also kept in
``answers`` under that id, so a message replayed after a crash reuses the answer it
already paid for instead of calling (and paying) again.

Prices come from ``genai-prices``; providers without a price model (embedded, Ollama)
cost $0.00.
"""

from __future__ import annotations

import operator
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trinity.db import connect, create_schema, immediate
from trinity.errors import ConfigError
from trinity.plan import BUDGET_THRESHOLDS_PCT

if TYPE_CHECKING:
    from sqlalchemy import MetaData

SUCCESS = "success"
ERROR = "error"
TIMEOUT = "timeout"
# Where an attempt sits in its request: the first try, a retry on the same provider,
# or a fallback to a later provider in the route.
PRIMARY, RETRY, FALLBACK = "primary", "retry", "fallback"


def crossed_thresholds(spent_usd: float, budget_usd: float) -> list[int]:
    """The budget thresholds (percent) that ``spent_usd`` has reached; 100 = spent."""
    if budget_usd <= 0:
        return list(BUDGET_THRESHOLDS_PCT) if spent_usd > 0 else []
    # Sums of float costs drift by ~1e-16: compare to a nano-dollar.
    return [p for p in BUDGET_THRESHOLDS_PCT if spent_usd * 100 >= budget_usd * p - 1e-7]


@dataclass(frozen=True)
class CallRecord:
    call_id: str
    request_id: str
    attempt: int
    route: str
    ts_ms: int
    sim_elapsed_s: float | None
    run_id: str | None
    agent: str
    provider: str
    provider_kind: str
    model: str
    local: bool
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    tokens_estimated: bool
    cost_usd: float
    latency_ms: float
    status: str
    error_class: str | None
    error: str | None
    event_id: str | None
    task_id: str | None


# A ledger row's columns in CallRecord's field order, and the statement that writes one.
_CALL_COLUMNS = tuple(f.name for f in fields(CallRecord))
_call_values = operator.attrgetter(*_CALL_COLUMNS)
_INSERT_CALL = (f"INSERT INTO calls({', '.join(_CALL_COLUMNS)})"
                f" VALUES ({', '.join('?' for _ in _CALL_COLUMNS)})")


def new_call_id() -> str:
    """A call's id: 32 hex digits, the wall-clock millisecond first and 80 random bits
    after, so ids sort by time and each new row lands at the right edge of the ledger's
    call-id index (a random id dirtied a random index page per call)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def price_usd(model: str, provider_id: str | None, *, input_tokens: int, output_tokens: int,
              cached_tokens: int = 0) -> Decimal:
    """The price of one call from genai-prices; ConfigError if it does not know the model."""
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                  cache_read_tokens=cached_tokens or None)
    try:
        return calc_price(usage, model_ref=model, provider_id=provider_id).total_price
    except LookupError as exc:
        raise ConfigError(f"genai-prices has no price for model {model!r}"
                          f" (provider {provider_id!r}): {exc}") from None


def declare(metadata: MetaData) -> None:
    """The ledger's tables (SQLAlchemy Core; see ``trinity.stores.schema``)."""
    from sqlalchemy import Column, Float, Index, Integer, Table, Text

    calls = Table("calls", metadata,
                  Column("call_id", Text, primary_key=True),
                  Column("request_id", Text, nullable=False),
                  Column("attempt", Integer, nullable=False),
                  Column("route", Text, nullable=False),
                  Column("ts_ms", Integer, nullable=False),
                  Column("sim_elapsed_s", Float),
                  Column("run_id", Text),
                  Column("agent", Text, nullable=False),
                  Column("provider", Text, nullable=False),
                  Column("provider_kind", Text, nullable=False),
                  Column("model", Text, nullable=False),
                  Column("local", Integer, nullable=False),
                  Column("input_tokens", Integer, nullable=False),
                  Column("output_tokens", Integer, nullable=False),
                  Column("cached_tokens", Integer, nullable=False),
                  Column("reasoning_tokens", Integer, nullable=False),
                  Column("tokens_estimated", Integer, nullable=False),
                  Column("cost_usd", Float, nullable=False),
                  Column("latency_ms", Float, nullable=False),
                  Column("status", Text, nullable=False),
                  Column("error_class", Text),
                  Column("error", Text),
                  Column("event_id", Text),
                  Column("task_id", Text))
    Index("calls_run", calls.c.run_id, calls.c.ts_ms)
    Index("calls_request", calls.c.request_id)
    # A successful answer by request, so a replayed message reuses what it paid for.
    Table("answers", metadata,
          Column("request_id", Text, primary_key=True),
          Column("call_id", Text, nullable=False),
          Column("provider", Text, nullable=False),
          Column("model", Text, nullable=False),
          Column("content", Text, nullable=False))


# -- schema: generated from declare() by `make schema`; a test keeps it current --
DDL = (
    "CREATE TABLE IF NOT EXISTS calls (call_id TEXT NOT NULL, request_id TEXT NOT NULL, "
    "attempt INTEGER NOT NULL, route TEXT NOT NULL, ts_ms INTEGER NOT NULL, "
    "sim_elapsed_s FLOAT, run_id TEXT, agent TEXT NOT NULL, provider TEXT NOT NULL, "
    "provider_kind TEXT NOT NULL, model TEXT NOT NULL, local INTEGER NOT NULL, "
    "input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cached_tokens "
    "INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL, tokens_estimated INTEGER NOT "
    "NULL, cost_usd FLOAT NOT NULL, latency_ms FLOAT NOT NULL, status TEXT NOT NULL, "
    "error_class TEXT, error TEXT, event_id TEXT, task_id TEXT, PRIMARY KEY (call_id))",
    "CREATE INDEX IF NOT EXISTS calls_request ON calls (request_id)",
    "CREATE INDEX IF NOT EXISTS calls_run ON calls (run_id, ts_ms)",
    "CREATE TABLE IF NOT EXISTS answers (request_id TEXT NOT NULL, call_id TEXT NOT "
    "NULL, provider TEXT NOT NULL, model TEXT NOT NULL, content TEXT NOT NULL, PRIMARY "
    "KEY (request_id))",
)
# Each table's columns: a store made before one existed gets it on open.
COLUMNS = {
    "calls": (
        "call_id TEXT NOT NULL",
        "request_id TEXT NOT NULL",
        "attempt INTEGER NOT NULL",
        "route TEXT NOT NULL",
        "ts_ms INTEGER NOT NULL",
        "sim_elapsed_s FLOAT",
        "run_id TEXT",
        "agent TEXT NOT NULL",
        "provider TEXT NOT NULL",
        "provider_kind TEXT NOT NULL",
        "model TEXT NOT NULL",
        "local INTEGER NOT NULL",
        "input_tokens INTEGER NOT NULL",
        "output_tokens INTEGER NOT NULL",
        "cached_tokens INTEGER NOT NULL",
        "reasoning_tokens INTEGER NOT NULL",
        "tokens_estimated INTEGER NOT NULL",
        "cost_usd FLOAT NOT NULL",
        "latency_ms FLOAT NOT NULL",
        "status TEXT NOT NULL",
        "error_class TEXT",
        "error TEXT",
        "event_id TEXT",
        "task_id TEXT",
    ),
    "answers": (
        "request_id TEXT NOT NULL",
        "call_id TEXT NOT NULL",
        "provider TEXT NOT NULL",
        "model TEXT NOT NULL",
        "content TEXT NOT NULL",
    ),
}
# -- end of generated schema --


def calls(conn: sqlite3.Connection, run_id: str | None = None, *,
          as_written: bool = False) -> list[dict[str, Any]]:
    """Every ledger row (of ``run_id`` when given), in the order the calls were made
    (``as_written``: in the order the rows were written)."""
    order = "rowid" if as_written else "ts_ms, rowid"
    cur = conn.execute(
        f"SELECT * FROM calls WHERE (? IS NULL OR run_id=?) ORDER BY {order}",
        (run_id, run_id))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def run_spend(conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
    """A run's calls, cost and tokens, summed by the store."""
    calls_, cost, tokens_in, tokens_out = conn.execute(
        "SELECT count(*), coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens), 0),"
        " coalesce(sum(output_tokens), 0) FROM calls WHERE run_id=?", (run_id,)).fetchone()
    return {"calls": int(calls_), "total_cost_usd": round(float(cost), 6),
            "input_tokens": int(tokens_in), "output_tokens": int(tokens_out)}


def usage(conn: sqlite3.Connection,
          run_id: str | None) -> list[tuple[str, str, str, int, float, int, int]]:
    """A run's calls by (agent, model, status): count, cost, input and output tokens."""
    return [(a, m, st, int(n), float(cost), int(tin), int(tout))
            for a, m, st, n, cost, tin, tout in conn.execute(
                "SELECT agent, model, status, count(*), sum(cost_usd), sum(input_tokens),"
                " sum(output_tokens) FROM calls WHERE run_id=? GROUP BY agent, model, status"
                " ORDER BY agent, model, status", (run_id,))]


class CostLedger:
    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.conn = connect(self.path, timeout_s=busy_timeout_ms / 1000, check_same_thread=False)
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        with self._write() as conn:
            create_schema(conn, DDL, COLUMNS)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # ARCHITECT and EXECUTOR write one row per model call each: the lock is polled
        # for, not slept on (it is held for well under a millisecond)
        with self._lock, immediate(self.conn, poll_busy_ms=self._busy_timeout_ms) as conn:
            yield conn

    def record(self, call: CallRecord, *, answer: str | None = None) -> None:
        """Write one attempt (and, for a success, its answer) in one transaction."""
        # its fields are plain values: read them directly (asdict deep-copies each one,
        # ~0.15 ms a call in a model agent's ledger path); SQLite stores a bool as 0 or 1
        with self._write() as conn:
            conn.execute(_INSERT_CALL, _call_values(call))
            if answer is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO answers(request_id, call_id, provider, model, content)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (call.request_id, call.call_id, call.provider, call.model, answer))

    def answer_for(self, request_id: str) -> tuple[str, str, str] | None:
        """(provider, model, content) of a request already answered, or None."""
        with self._lock:
            row = self.conn.execute(
                "SELECT provider, model, content FROM answers WHERE request_id=?",
                (request_id,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def spent_usd(self, run_id: str | None) -> float:
        with self._lock:
            row = self.conn.execute(
                "SELECT coalesce(sum(cost_usd), 0) FROM calls WHERE run_id IS ?",
                (run_id,)).fetchone()
        return float(row[0])

    def spent_since(self, run_id: str, sim_from_s: float) -> float:
        """USD spent by a run's calls made after simulated time ``sim_from_s``."""
        with self._lock:
            row = self.conn.execute(
                "SELECT coalesce(sum(cost_usd), 0) FROM calls WHERE run_id=?"
                " AND sim_elapsed_s > ?", (run_id, sim_from_s)).fetchone()
        return float(row[0])

    def calls(self, run_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return calls(self.conn, run_id)

    def totals(self, run_id: str | None = None) -> dict[str, Any]:
        """Totals of the ledger (or of one run), all computed from the rows."""
        return summarize(self.calls(run_id))

    def close(self) -> None:
        self.conn.close()


def _group(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        g = groups.setdefault(str(row[key]), {"calls": 0, "cost_usd": 0.0, "input_tokens": 0,
                                              "output_tokens": 0, "successes": 0})
        g["calls"] += 1
        g["cost_usd"] += row["cost_usd"]
        g["input_tokens"] += row["input_tokens"]
        g["output_tokens"] += row["output_tokens"]
        g["successes"] += row["status"] == SUCCESS
    for g in groups.values():
        g["cost_usd"] = round(g["cost_usd"], 6)
    return groups


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals by agent, model and provider; local share of calls and tokens; success rate.

    ``total_calls`` counts attempts (every row is one real call); ``requests`` counts
    the distinct requests they served.
    """
    attempts = len(rows)
    tokens = sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    local_tokens = sum(r["input_tokens"] + r["output_tokens"] for r in rows if r["local"])
    successes = sum(r["status"] == SUCCESS for r in rows)
    return {
        "total_cost_usd": round(sum(r["cost_usd"] for r in rows), 6),
        "total_calls": attempts,
        "requests": len({r["request_id"] for r in rows}),
        "success_rate": round(successes / attempts, 4) if attempts else None,
        "by_status": {s: sum(r["status"] == s for r in rows) for s in (SUCCESS, ERROR, TIMEOUT)},
        "by_route": {s: sum(r["route"] == s for r in rows) for s in (PRIMARY, RETRY, FALLBACK)},
        "input_tokens": sum(r["input_tokens"] for r in rows),
        "output_tokens": sum(r["output_tokens"] for r in rows),
        "estimated_token_rows": sum(bool(r["tokens_estimated"]) for r in rows),
        "local_share_calls": round(sum(bool(r["local"]) for r in rows) / attempts, 4)
        if attempts else None,
        "local_share_tokens": round(local_tokens / tokens, 4) if tokens else None,
        "by_agent": _group(rows, "agent"),
        "by_model": _group(rows, "model"),
        "by_provider": _group(rows, "provider"),
    }
