"""How Trinity's SQLite stores are opened, and how they open a write transaction.

:func:`connect` is the one way a store is opened for writing: the file is created
readable by its owner only before SQLite opens it, and SQLite gives the ``-wal`` and
``-shm`` files it creates the mode of the database file, so a store is private from
its first byte whether supervisord (``umask=077``) or anything else started the
process.

``BEGIN IMMEDIATE`` takes the write lock up front: a deferred transaction that later
writes gets SQLITE_BUSY at once, without the busy handler. A store written by several
busy processes at once (the journal, the cost ledger) polls for that lock instead
(:func:`begin_immediate_polling`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

PRIVATE_MODE = 0o600


def make_private(path: Path) -> None:
    """Create ``path`` empty if it is missing, and make it and its WAL files owner-only.

    Errors are left to the open that follows (SQLite names them better); files of
    another owner are left as they are.
    """
    with suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_MODE))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with suppress(OSError):
            os.chmod(name, PRIVATE_MODE)


def connect(path: Path, *, timeout_s: float, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating) a store readable by its owner only, in autocommit mode: writes go
    through :func:`immediate`."""
    make_private(path)
    return sqlite3.connect(path, isolation_level=None, timeout=timeout_s,
                           check_same_thread=check_same_thread)


def create_schema(conn: sqlite3.Connection, ddl: Iterable[str],
                  columns: Mapping[str, Iterable[str]]) -> None:
    """A store's tables and indexes, created if missing, and the columns a table made by
    earlier code lacks, added (in the caller's write transaction). A column SQLite cannot
    add to a table that has rows (NOT NULL without a default, a key) is refused with
    sqlite3.OperationalError naming it. Indexes come last: one may be on an added column."""
    statements = list(ddl)
    tables = [s for s in statements if s.startswith("CREATE TABLE")]
    for statement in tables:
        conn.execute(statement)
    for table, definitions in columns.items():
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for definition in definitions:
            if definition.split(" ", 1)[0].strip('"') not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")
    for statement in statements:
        if statement not in tables:
            conn.execute(statement)


def begin_immediate_polling(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """``BEGIN IMMEDIATE``, polling for the write lock every 50 us to 0.5 ms.

    SQLite's busy handler sleeps 1, 2, 5, 10, ... ms between attempts, while the other
    writer (a publisher's or a consumer's batch, another agent's ledger row) usually lets
    go well within a millisecond: with two busy processes, a fifth of their time went to
    those sleeps. So the busy timeout is off for this one statement (it stays on for
    everything else, ``busy_timeout_ms``) and the lock is polled here, still up to
    ``busy_timeout_ms`` in all (then SQLite's "database is locked" is raised).
    """
    conn.execute("PRAGMA busy_timeout=0")
    try:
        deadline = 0.0
        delay = 50e-6
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                now = time.monotonic()
                if not deadline:
                    deadline = now + busy_timeout_ms / 1000
                elif now > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.0005)
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


@contextmanager
def immediate(conn: sqlite3.Connection, *,
              poll_busy_ms: int | None = None) -> Iterator[sqlite3.Connection]:
    """Commit what the block writes, or roll all of it back if the block raises. With
    ``poll_busy_ms`` the write lock is polled for (``begin_immediate_polling``)."""
    if poll_busy_ms is None:
        conn.execute("BEGIN IMMEDIATE")
    else:
        begin_immediate_polling(conn, poll_busy_ms)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to a store (raises sqlite3.Error if the file is missing or
    unreadable): the one way a reader opens a store another process writes."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
    conn.execute("PRAGMA busy_timeout=2000")
    return conn


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection inside one read transaction, so everything read through it
    agrees (a consistent view of the store while writers go on); closed after the block."""
    conn = open_readonly(path)
    try:
        conn.execute("BEGIN")
        yield conn
    finally:
        conn.close()
