"""Stores written by the code before the stores declared their schemas open, migrate on
open, and report exactly as that code reported them.

The fixture (``tests/fixtures/stores_dfa0884``, see its README) is a compressed run made
by that code, with the CSV files it exported and the criteria it printed.
"""

from __future__ import annotations

import csv
import importlib
import io
import shutil
import sqlite3
from pathlib import Path

import pytest

from trinity.bus.journal import Journal
from trinity.controller.reports import criteria
from trinity.controller.reports.export import export_run
from trinity.controller.reports.persistence import validate
from trinity.settings import Settings
from trinity.stores import costs, runs, schema
from trinity.stores import patterns as pattern_store
from trinity.stores.costs import CostLedger

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "stores_dfa0884"
FILES = {"trinity.stores.journal": "trinity_messages", "trinity.stores.runs": "trinity_messages",
         "trinity.stores.costs": "trinity_costs", "trinity.stores.patterns": "trinity_patterns"}


# Columns declared after the fixture's code (dfa0884), each (table, column).
ADDED_SINCE = {("detections", "text"), ("exemplars", "hits"), ("exemplars", "last_seen_ms"),
               ("exemplars", "text_key"), ("emitted_events", "run_id"),
               ("emitted_events", "sim_elapsed_s")}
# (table, index) declared since, made on open like the columns
INDEXES_ADDED_SINCE = {("exemplars", "exemplars_key"), ("emitted_events", "emitted_events_run")}


@pytest.fixture
def legacy(tmp_path: Path) -> Settings:
    """A data folder holding the fixture's stores and log folder."""
    for name in set(FILES.values()):
        conn = sqlite3.connect(tmp_path / f"{name}.db")
        conn.executescript((FIXTURE / f"{name}.sql").read_text(encoding="utf-8"))
        conn.close()
    shutil.copytree(FIXTURE / "logs", tmp_path / "logs")
    return Settings.from_env({"TRINITY_DATA_DIR": str(tmp_path)})


def columns(conn: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    """(name, affinity, not null, default, primary key position) of each column, as SQLite
    treats them: a primary key column is NOT NULL in effect whether it was declared so."""
    found = []
    for _, name, kind, notnull, default, pk in conn.execute(f"PRAGMA table_info({table})"):
        found.append((name, affinity(kind), bool(notnull or pk), default, pk))
    return found


def affinity(kind: str) -> str:
    """SQLite's column affinity of a declared type (its documented rules, in order)."""
    kind = kind.upper()
    if "INT" in kind:
        return "INTEGER"
    if any(word in kind for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in kind or not kind:
        return "BLOB"
    if any(word in kind for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def indexes(conn: sqlite3.Connection, table: str) -> set[tuple[str, bool, tuple[str, ...]]]:
    """(name, unique, columns) of each named index and unique constraint's columns."""
    found = set()
    for _, name, unique, origin, _ in conn.execute(f"PRAGMA index_list({table})"):
        cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info('{name}')"))
        found.add(("(constraint)" if origin != "c" else name, bool(unique), cols))
    return found


@pytest.mark.parametrize("store", schema.STORES)
def test_the_legacy_tables_are_the_declared_ones(legacy: Settings, store: str) -> None:
    declared = sqlite3.connect(":memory:")
    for ddl in importlib.import_module(store).DDL:
        declared.execute(ddl)
    old = sqlite3.connect(legacy.data_dir / f"{FILES[store]}.db")
    tables = [name for (name,) in declared.execute(
        "SELECT name FROM sqlite_master WHERE type='table'")]
    present = [t for t in tables if old.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (t,)).fetchone()]
    assert present, f"the fixture holds none of {store}'s tables"
    for table in present:
        now = columns(declared, table)
        added = [c for c in now if (table, c[0]) in ADDED_SINCE]
        # A column declared since the fixture's code comes last, and can be added to a
        # full table (nullable or with a default): ``create_schema`` adds it on open.
        assert columns(old, table) + added == now, table
        assert all(not notnull or default is not None for _, _, notnull, default, _ in added)
        added_indexes = {i for i in indexes(declared, table)
                         if (table, i[0]) in INDEXES_ADDED_SINCE}
        assert indexes(old, table) | added_indexes == indexes(declared, table), table


def test_the_stores_open_and_migrate_what_they_lack(legacy: Settings) -> None:
    """Tables the earlier code made later, or elsewhere, are added on open; nothing of the
    existing ones changes."""
    before = {p: row_counts(p) for p in legacy.data_dir.glob("*.db")}
    journal = Journal(legacy.messages_db, source="test")
    try:
        runs.ensure_schema(journal.conn)
        assert runs.has_schema(journal.conn, "emitted_events")
        run = runs.latest_run(journal.conn)
        assert run is not None and run.status == runs.COMPLETED and run.ended_ms is not None
    finally:
        journal.close()
    CostLedger(legacy.costs_db).close()
    conn = sqlite3.connect(legacy.patterns_db)
    with conn:
        pattern_store.ensure_schema(conn)
    assert pattern_store.has_schema(conn)
    assert pattern_store.exemplar_count(conn) == 17
    conn.close()
    for path, counts in before.items():
        after = row_counts(path)
        assert {t: n for t, n in after.items() if t in counts} == counts, path.name


def row_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}
    finally:
        conn.close()


# CSV columns added since the fixture's code (appended last), and the value every row of
# an earlier run has in them: an earlier store knows of no external event.
CSV_COLUMNS_ADDED_SINCE = {"events.csv": {"external": "false"},
                           "outcomes.csv": {"external": "false"}}


def test_the_export_is_the_one_the_earlier_code_wrote(legacy: Settings, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    written = export_run(legacy, legacy.log_dir, None, out)
    assert set(written) == {p.name for p in (FIXTURE / "expected").glob("*.csv")}
    for name in written:
        expected = (FIXTURE / "expected" / name).read_text()
        added = CSV_COLUMNS_ADDED_SINCE.get(name, {})
        if not added:
            assert (out / name).read_text() == expected, name
            continue
        rows = list(csv.reader(io.StringIO((out / name).read_text())))
        width = len(rows[0]) - len(added)
        assert rows[0][width:] == list(added), name
        assert all(row[width:] == list(added.values()) for row in rows[1:]), name
        assert rows[1:] and [row[:width] for row in rows] == list(
            csv.reader(io.StringIO(expected))), name


def test_the_criteria_are_the_ones_the_earlier_code_printed(legacy: Settings) -> None:
    _, measured = criteria.evaluate(legacy)
    lines = [line for line in criteria.format_table(measured) if line.startswith("  ")]
    assert lines == (FIXTURE / "expected" / "criteria.txt").read_text().splitlines()


def test_persistence_validates_on_the_legacy_stores(legacy: Settings) -> None:
    state, problems = validate(legacy)
    assert problems == []
    assert state is not None and state["events"] == 12 and state["patterns"]["exemplars"] == 17
    with sqlite3.connect(legacy.costs_db) as conn:
        assert costs.run_spend(conn, state["run_id"])["calls"] == 24
