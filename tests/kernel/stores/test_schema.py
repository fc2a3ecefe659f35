"""Each store's DDL is what its SQLAlchemy declaration compiles to, and its statements fit
its tables."""

from __future__ import annotations

import importlib
import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import modules_imported
from trinity.stores import journal, schema

SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE)\b")


@pytest.mark.parametrize("store", schema.STORES)
def test_the_generated_ddl_is_the_declaration_compiled(store: str) -> None:
    module = importlib.import_module(store)
    assert schema.compile_ddl(module) == module.DDL, "run `make schema`"
    _, text, regenerated = schema.source_with_block(module)
    assert regenerated == text


def test_the_check_fails_on_a_stale_block(monkeypatch: pytest.MonkeyPatch) -> None:
    assert schema.main(["--check"]) == 0
    monkeypatch.setattr(journal, "declare", lambda metadata: None)  # the tables are gone
    assert schema.main(["--check"]) == 1


@pytest.mark.parametrize("store", schema.STORES)
def test_each_statement_of_the_store_fits_its_tables(store: str) -> None:
    module = importlib.import_module(store)
    db = sqlite3.connect(":memory:")
    for ddl in module.DDL:
        db.execute(ddl)
    statements = [value for value in vars(module).values()
                  if isinstance(value, str) and SQL.match(value)]
    if store == "trinity.stores.journal":
        statements.append(journal.journaled_ids_query(3))
    for statement in statements:
        db.execute(f"EXPLAIN {statement}", (None,) * statement.count("?"))


def test_the_processes_never_import_sqlalchemy() -> None:
    """Its import costs ~19 MB in each long-lived process: the stores only declare with it."""
    assert modules_imported(
        "import trinity.agents.witness.process, trinity.agents.architect\n"
        "import trinity.agents.executor, trinity.controller.process.controller\n"
        "import trinity.controller.supervision.crashwatch", ("sqlalchemy",)) == []


def test_a_store_made_before_a_column_existed_gets_it_on_open(tmp_path: Path) -> None:
    """The ledger as an earlier version would have made it, without two nullable columns:
    opening adds them, its rows keep their values, new rows fill them."""
    from trinity.stores.costs import COLUMNS, DDL, CallRecord, CostLedger

    path = tmp_path / "trinity_costs.db"
    older = sqlite3.connect(path)
    calls = next(d for d in DDL if d.startswith("CREATE TABLE IF NOT EXISTS calls"))
    kept = [c for c in COLUMNS["calls"] if c.split()[0] not in ("error", "task_id")]
    older.execute(f"CREATE TABLE calls ({', '.join(kept)}, PRIMARY KEY (call_id))")
    assert "task_id TEXT" in calls and "error TEXT" in calls  # declared today
    names = [c.split()[0] for c in kept]
    older.execute(f"INSERT INTO calls ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                  ["c0", "r0", 1, "primary", 1, None, "run", "executor", "embedded",
                   "embedded", "m", 1, 3, 4, 0, 0, 0, 0.0, 5.0, "success", None, "e0"])
    older.commit()
    older.close()
    ledger = CostLedger(path)
    try:
        old_row, = ledger.calls()
        assert old_row["call_id"] == "c0" and old_row["task_id"] is None
        ledger.record(CallRecord("c1", "r1", 1, "primary", 2, None, "run", "executor",
                                 "embedded", "embedded", "m", True, 3, 4, 0, 0, False, 0.0,
                                 5.0, "error", "timeout", "slow", "e1", "e1/t1"))
        assert [c["task_id"] for c in ledger.calls()] == [None, "e1/t1"]
    finally:
        ledger.close()


def test_a_column_sqlite_cannot_add_is_refused_by_name(tmp_path: Path) -> None:
    from trinity.db import create_schema

    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (a TEXT)")
    conn.execute("INSERT INTO t VALUES ('row')")
    with pytest.raises(sqlite3.OperationalError, match="NOT NULL"):
        create_schema(conn, (), {"t": ("a TEXT", "b INTEGER NOT NULL")})
