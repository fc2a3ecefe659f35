"""Stores and the supervisord control socket are their owner's only.

The stores are opened through the project's own APIs under a permissive umask (as a
test or ``trinity emit`` runs, outside supervisord's ``umask=077``): the database,
its ``-wal`` and ``-shm`` files and the FAISS index come out 0600. The slow test runs
a real compressed run (with CURVE keys, so the whole bus runs encrypted) and reads the
modes of the live control socket and of every store.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.agents.conftest import embedder  # noqa: F401 - the agents' session fixture
from tests.conftest import BIN, Project, wait_for
from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.cli.keys import keys as keys_command
from trinity.db import connect
from trinity.stores.costs import CostLedger

STORES = ("trinity_messages.db", "trinity_costs.db", "trinity_patterns.db")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _store_files(folder: Path) -> dict[str, int]:
    names = [f"{db}{suffix}" for db in STORES for suffix in ("", "-wal", "-shm")]
    names.append("trinity_patterns.faiss")
    return {name: _mode(folder / name) for name in names if (folder / name).exists()}


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
        modes = _store_files(tmp_path)  # while open: the WAL and shared-memory files exist
    finally:
        store.close()
        ledger.close()
        journal.close()
    assert set(modes) == {f"{db}{suffix}" for db in STORES for suffix in ("", "-wal", "-shm")
                          } | {"trinity_patterns.faiss"}
    assert modes == dict.fromkeys(modes, 0o600)
    (tmp_path / "control").write_text("")  # what the umask gives any other file
    assert _mode(tmp_path / "control") == 0o644


@pytest.mark.usefixtures("permissive_umask")
def test_a_store_left_readable_by_others_is_made_private_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "trinity_costs.db"
    old = sqlite3.connect(path)  # as an older version left it: 0644, WAL files too
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.execute("INSERT INTO t VALUES (1)")
    old.commit()
    assert {_mode(p) for p in tmp_path.iterdir()} == {0o644}
    conn = connect(path, timeout_s=1)
    try:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]  # nothing lost
        assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
            "trinity_costs.db": 0o600, "trinity_costs.db-wal": 0o600,
            "trinity_costs.db-shm": 0o600}
    finally:
        conn.close()
        old.close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_supervised_run_with_curve_keys_keeps_socket_and_stores_private(
    project: Project
) -> None:
    keys = CliRunner().invoke(keys_command, ["generate"],
                              env={"TRINITY_DATA_DIR": str(project.root)})
    assert keys.exit_code == 0, keys.output
    run = subprocess.Popen(
        [str(BIN / "trinity"), "run", "--duration", "3", "--time-scale", "2880"],
        cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        control = project.root / ".run" / "supervisor.sock"
        wait_for(control.exists, 60, "supervisord's control socket")
        assert stat.S_ISSOCK(os.stat(control).st_mode)
        assert _mode(control) == 0o700
        assert _mode(control.parent) == 0o700
        assert project.supervisorctl("status").returncode in (0, 3)  # the owner gets in
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, out
    # Every event went through the CURVE bus: WITNESS classified each one.
    detected = re.search(r"100% Event Detection\s+(\d+) of (\d+) classified", out)
    assert detected and detected[1] == detected[2] and int(detected[1]) >= 6, out
    log = (project.root / "logs" / "24h_test" / "trinity.log").read_text()
    for name in ("witness", "architect", "executor", "controller"):
        assert f"{name}: every bus socket uses CURVE" in log
    modes = _store_files(project.root)
    assert {"trinity_messages.db", "trinity_costs.db", "trinity_patterns.db",
            "trinity_patterns.faiss"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600)
