"""Stores are their owner's only.

The stores are opened through the project's own APIs under a permissive umask (as a
test or ``trinity emit`` runs, outside supervisord's ``umask=077``): the database,
its ``-wal`` and ``-shm`` files and the FAISS index come out 0600. The supervised run
with CURVE keys that reads the modes of the live control socket and of every store is
tests/system/test_security.py.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.conftest import embedder  # noqa: F401 - the agents' session fixture
from tests.kernel.stores._permissions import STORES, mode_of, store_files
from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.db import connect
from trinity.stores.costs import CostLedger


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("permissive_umask")
def test_stores_opened_through_their_apis_are_owner_only(
    tmp_path: Path, embedder: Embedder  # noqa: F811 - the imported fixture
) -> None:
    journal = Journal(tmp_path / "trinity_messages.db", source="test")
    ledger = CostLedger(tmp_path / "trinity_costs.db")
    store = PatternStore(tmp_path / "trinity_patterns.db", embedder)
    try:
        with journal.transaction() as tx:
            tx.publish("telemetry_stream", b'{"i": 1}')
        store.seed([("panic: nil pointer dereference", "critical_error", "t1")])
        store.save_index()
        modes = store_files(tmp_path)  # while open: the WAL and shared-memory files exist
    finally:
        store.close()
        ledger.close()
        journal.close()
    assert set(modes) == {f"{db}{suffix}" for db in STORES for suffix in ("", "-wal", "-shm")
                          } | {"trinity_patterns.faiss"}
    assert modes == dict.fromkeys(modes, 0o600)
    (tmp_path / "control").write_text("")  # what the umask gives any other file
    assert mode_of(tmp_path / "control") == 0o644


@pytest.mark.usefixtures("permissive_umask")
def test_a_store_left_readable_by_others_is_made_private_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "trinity_costs.db"
    old = sqlite3.connect(path)  # as an older version left it: 0644, WAL files too
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.execute("INSERT INTO t VALUES (1)")
    old.commit()
    assert {mode_of(p) for p in tmp_path.iterdir()} == {0o644}
    conn = connect(path, timeout_s=1)
    try:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]  # nothing lost
        assert {p.name: mode_of(p) for p in tmp_path.iterdir()} == {
            "trinity_costs.db": 0o600, "trinity_costs.db-wal": 0o600,
            "trinity_costs.db-shm": 0o600}
    finally:
        conn.close()
        old.close()
