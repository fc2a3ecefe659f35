"""The one way Trinity's SQLite stores (outside the bus journal) open a write transaction.

``BEGIN IMMEDIATE`` takes the write lock up front: a deferred transaction that later
writes gets SQLITE_BUSY at once, without the busy handler. The journal has its own
polling variant (``bus/journal.py``) for its hot path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Commit what the block writes, or roll all of it back if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
