"""Waiting for a store's write lock: the cost ledger, written by two busy agents at once,
polls for it as the journal does, instead of sleeping in SQLite's busy handler."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import hold_write_lock
from trinity.db import begin_immediate_polling, connect
from trinity.stores.costs import SUCCESS, CallRecord, CostLedger, new_call_id


def record(call_id: str) -> CallRecord:
    return CallRecord(call_id, f"req-{call_id}", 1, "primary", 1, None, None, "architect",
                      "local", "llama_cpp", "m", True, 10, 5, 0, 0, False, 0.0, 1.0, SUCCESS,
                      None, None, "e1", None)


def test_the_ledger_polls_for_the_lock_another_agent_holds(tmp_path: Path) -> None:
    ledger = CostLedger(tmp_path / "costs.db")
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    holder = hold_write_lock(tmp_path / "costs.db", 0.15)
    started = time.monotonic()
    ledger.record(record("c1"), answer="{}")
    waited = time.monotonic() - started
    holder.join()
    assert 0.1 < waited < 2.0
    assert [c["call_id"] for c in ledger.calls()] == ["c1"]
    # polled: many attempts with the busy handler off, then the timeout put back
    assert statements.count("BEGIN IMMEDIATE") > 10
    assert statements[0] == "PRAGMA busy_timeout=0"
    assert ledger.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    ledger.close()


def test_polling_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    conn = connect(db, timeout_s=0.2)
    conn.execute("PRAGMA journal_mode=WAL")
    holder = hold_write_lock(db, 1.0)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate_polling(conn, 200)
    waited = time.monotonic() - started
    holder.join()
    assert 0.15 < waited < 0.9
    assert not conn.in_transaction
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 200
    begin_immediate_polling(conn, 200)  # free again: taken at once
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    conn.close()


def test_call_ids_are_unique_and_sort_by_time(tmp_path: Path) -> None:
    """So each new ledger row lands at the right edge of the call-id index."""
    ids = []
    for _ in range(3):
        ids += [new_call_id() for _ in range(500)]
        time.sleep(0.002)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)
    assert ids[0][:12] < ids[-1][:12]
    ledger = CostLedger(tmp_path / "costs.db")
    ledger.record(record(ids[0]))
    row = ledger.calls()[0]
    assert row["call_id"] == ids[0] and row["local"] == 1 and row["tokens_estimated"] == 0
    assert row["input_tokens"] == 10 and row["event_id"] == "e1" and row["sim_elapsed_s"] is None
    ledger.close()
