"""Shared by the bus tests and their helper processes (``_publisher.py``, ``_consumer.py``).

The helper scripts are run as ``python tests/bus/_xxx.py``, so this module is
imported both as ``_common`` (scripts) and as ``tests.bus._common`` (tests).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import MappingProxyType

from trinity.bus.journal import Transaction
from trinity.bus.message import Message
from trinity.contract import Topology
from trinity.settings import Settings

ALPHA = "alpha"
BETA = "beta"
BEATS = "beats"  # ephemeral: used as a probe that the wire is connected
CONSUMER = "consumer"
PUBLISHER = "publisher"

TOPOLOGY = Topology(
    consumers=MappingProxyType({ALPHA: (CONSUMER,), BETA: (CONSUMER,), BEATS: (CONSUMER,)}),
    ephemeral=frozenset({BEATS}),
)

APPLIED_DDL = (
    # Deliberately no UNIQUE constraint: a duplicate application must be visible.
    "CREATE TABLE IF NOT EXISTS applied ("
    " stream TEXT NOT NULL, seq INTEGER NOT NULL, msg_id TEXT NOT NULL, idx INTEGER NOT NULL)"
)


def make_settings(data_dir: Path | str, run_dir: Path | str, **overrides: object) -> Settings:
    env = {"TRINITY_DATA_DIR": str(data_dir), "TRINITY_RUN_DIR": str(run_dir)}
    return Settings.from_env(env, **overrides)


def record_applied(msg: Message, tx: Transaction) -> None:
    """The consumers' handler: one row per application, in the node's transaction."""
    idx = json.loads(msg.payload)["i"]
    tx.conn.execute(
        "INSERT INTO applied(stream, seq, msg_id, idx) VALUES (?, ?, ?, ?)",
        (msg.stream, msg.seq, msg.msg_id, idx),
    )


def applied_rows(db: Path) -> list[tuple[str, int, str, int]]:
    """Every row of ``applied`` in insertion (rowid) order."""
    conn = sqlite3.connect(db)
    try:
        return [
            (str(s), int(q), str(m), int(i))
            for s, q, m, i in conn.execute(
                "SELECT stream, seq, msg_id, idx FROM applied ORDER BY rowid"
            )
        ]
    finally:
        conn.close()


def exactly_once_problems(
    rows: list[tuple[str, int, str, int]], expected: dict[str, int]
) -> list[str]:
    """What is wrong with ``rows`` for ``expected`` messages per stream (empty if nothing)."""
    problems: list[str] = []
    total = sum(expected.values())
    if len(rows) != total:
        problems.append(f"{len(rows)} rows applied, expected {total}")
    for stream, count in expected.items():
        mine = [r for r in rows if r[0] == stream]
        seqs = [r[1] for r in mine]
        dupes = len(seqs) - len(set(seqs))
        if dupes:
            problems.append(f"{stream}: {dupes} duplicate seq applications")
        ids = [r[2] for r in mine]
        if len(ids) != len(set(ids)):
            problems.append(f"{stream}: duplicate message ids applied")
        idxs = sorted(r[3] for r in mine)
        if idxs != list(range(count)):
            missing = sorted(set(range(count)) - set(idxs))
            problems.append(
                f"{stream}: payload indices are not exactly 0..{count - 1}"
                f" ({len(idxs)} applied, {len(missing)} missing, first missing {missing[:5]})"
            )
        out_of_order = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b <= a]
        if out_of_order:
            problems.append(
                f"{stream}: seq not strictly increasing in rowid order at {out_of_order[:5]}"
            )
        if set(seqs) != set(range(1, count + 1)):
            problems.append(f"{stream}: applied seqs are not exactly 1..{count}")
    return problems
