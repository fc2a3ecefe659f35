"""The journal store (``trinity_messages.db``): messages, streams, cursors, dead letters.

Its tables are declared here (:func:`declare`) and every statement on them is written
here: the bus's hot path (``bus/journal.py``: publish, apply, advance a cursor,
dead-letter, prune) executes the statements below as they are, and every other module
reads the journal through the functions at the end, on a read-only connection
(:func:`trinity.db.reading`). The run store's tables live in the same file
(``trinity.stores.runs``), so an agent records its outcome in the transaction that
advances its cursor.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import MetaData

FILE = "trinity_messages.db"


def declare(metadata: MetaData) -> None:
    """The journal's tables (SQLAlchemy Core; see ``trinity.stores.schema``)."""
    from sqlalchemy import BLOB, Column, Integer, Table, Text, text

    Table("streams", metadata,
          Column("stream", Text, primary_key=True),
          Column("head", Integer, nullable=False, server_default=text("0")))
    # One row per durable message: (stream, seq) is its place, msg_id its idempotency key.
    Table("messages", metadata,
          Column("stream", Text, primary_key=True),
          Column("seq", Integer, primary_key=True),
          Column("msg_id", Text, nullable=False, unique=True),
          Column("source", Text, nullable=False),
          Column("created_ms", Integer, nullable=False),
          Column("payload", BLOB, nullable=False),
          sqlite_with_rowid=False)
    Table("cursors", metadata,
          Column("consumer", Text, primary_key=True),
          Column("stream", Text, primary_key=True),
          Column("seq", Integer, nullable=False, server_default=text("0")),
          Column("updated_ms", Integer, nullable=False))
    Table("dead_letters", metadata,
          Column("id", Integer, primary_key=True),
          Column("created_ms", Integer, nullable=False),
          Column("consumer", Text, nullable=False),
          Column("stream", Text),
          Column("msg_id", Text),
          Column("reason", Text, nullable=False),
          Column("size", Integer, nullable=False),
          Column("raw", BLOB))


# -- schema: generated from declare() by `make schema`; a test keeps it current --
DDL = (
    "CREATE TABLE IF NOT EXISTS streams (stream TEXT NOT NULL, head INTEGER DEFAULT 0 "
    "NOT NULL, PRIMARY KEY (stream))",
    "CREATE TABLE IF NOT EXISTS messages (stream TEXT NOT NULL, seq INTEGER NOT NULL, "
    "msg_id TEXT NOT NULL, source TEXT NOT NULL, created_ms INTEGER NOT NULL, payload "
    "BLOB NOT NULL, PRIMARY KEY (stream, seq), UNIQUE (msg_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS cursors (consumer TEXT NOT NULL, stream TEXT NOT NULL, "
    "seq INTEGER DEFAULT 0 NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY "
    "(consumer, stream))",
    "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER NOT NULL, created_ms INTEGER "
    "NOT NULL, consumer TEXT NOT NULL, stream TEXT, msg_id TEXT, reason TEXT NOT NULL, "
    "size INTEGER NOT NULL, raw BLOB, PRIMARY KEY (id))",
)
# Each table's columns: a store made before one existed gets it on open.
COLUMNS = {
    "streams": (
        "stream TEXT NOT NULL",
        "head INTEGER DEFAULT 0 NOT NULL",
    ),
    "messages": (
        "stream TEXT NOT NULL",
        "seq INTEGER NOT NULL",
        "msg_id TEXT NOT NULL",
        "source TEXT NOT NULL",
        "created_ms INTEGER NOT NULL",
        "payload BLOB NOT NULL",
    ),
    "cursors": (
        "consumer TEXT NOT NULL",
        "stream TEXT NOT NULL",
        "seq INTEGER DEFAULT 0 NOT NULL",
        "updated_ms INTEGER NOT NULL",
    ),
    "dead_letters": (
        "id INTEGER NOT NULL",
        "created_ms INTEGER NOT NULL",
        "consumer TEXT NOT NULL",
        "stream TEXT",
        "msg_id TEXT",
        "reason TEXT NOT NULL",
        "size INTEGER NOT NULL",
        "raw BLOB",
    ),
}
# -- end of generated schema --


# -- the bus's hot path ----------------------------------------------------------------

# A Message (bus/message.py) is a tuple of these columns in this order: it is the row.
INSERT_MESSAGE = ("INSERT INTO messages(stream, seq, msg_id, source, created_ms, payload)"
                  " VALUES (?, ?, ?, ?, ?, ?)")
INSERT_MESSAGE_ONCE = INSERT_MESSAGE.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
# A batch is inserted CHUNK rows to a statement: one statement step per row (what
# executemany does) cost ~1 us more per row than the row's own insert, ~30 % of a
# journaled publish in bench-bus. The remainder of a batch goes through executemany,
# so only two statements are ever prepared.
CHUNK = 50
INSERT_CHUNK = INSERT_MESSAGE + ", (?, ?, ?, ?, ?, ?)" * (CHUNK - 1)
# Ids already journaled, among at most MAX_IDS_PER_QUERY given ones.
MAX_IDS_PER_QUERY = 900
DECLARE_STREAM = "INSERT OR IGNORE INTO streams(stream, head) VALUES (?, 0)"
DECLARE_CURSOR = ("INSERT OR IGNORE INTO cursors(consumer, stream, seq, updated_ms)"
                  " VALUES (?, ?, 0, ?)")
SELECT_HEAD = "SELECT head FROM streams WHERE stream=?"
SELECT_HEADS = "SELECT stream, head FROM streams"
RAISE_HEAD = "UPDATE streams SET head=? WHERE stream=? AND head < ?"
ADVANCE_CURSOR = ("INSERT INTO cursors(consumer, stream, seq, updated_ms) VALUES (?, ?, ?, ?)"
                  " ON CONFLICT(consumer, stream) DO UPDATE SET seq=excluded.seq,"
                  " updated_ms=excluded.updated_ms WHERE excluded.seq > cursors.seq")
SELECT_CURSOR = "SELECT seq FROM cursors WHERE consumer=? AND stream=?"
READ_AFTER = ("SELECT seq, msg_id, source, created_ms, payload FROM messages"
              " WHERE stream=? AND seq>? ORDER BY seq LIMIT ?")
IDS_BETWEEN = "SELECT seq, msg_id FROM messages WHERE stream=? AND seq BETWEEN ? AND ?"
INSERT_DEAD_LETTER = ("INSERT INTO dead_letters(created_ms, consumer, stream, msg_id, reason,"
                      " size, raw) VALUES (?, ?, ?, ?, ?, ?, ?)")
# Messages every consumer of their stream has applied.
PRUNE = ("DELETE FROM messages WHERE seq <= ("
         " SELECT min(c.seq) FROM cursors c WHERE c.stream = messages.stream)")


def journaled_ids_query(count: int) -> str:
    """The statement finding which of ``count`` (<= MAX_IDS_PER_QUERY) ids are journaled."""
    return f"SELECT msg_id FROM messages WHERE msg_id IN ({','.join('?' * count)})"


# -- reads for everyone else -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Backlog:
    stream: str
    consumer: str
    head: int
    cursor: int

    @property
    def pending(self) -> int:
        return self.head - self.cursor


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    created_ms: int
    consumer: str
    stream: str | None
    msg_id: str | None
    reason: str
    size: int
    raw: bytes


def backlogs(conn: sqlite3.Connection) -> list[Backlog]:
    """Per queue and consumer: published head minus the consumer's durable cursor."""
    return [Backlog(s, c, int(h), int(q)) for s, c, h, q in conn.execute(
        "SELECT s.stream, c.consumer, s.head, c.seq FROM streams s"
        " JOIN cursors c ON c.stream = s.stream ORDER BY s.stream, c.consumer")]


def dead_letters(conn: sqlite3.Connection, consumer: str | None = None,
                 newest: int | None = None) -> list[DeadLetter]:
    """Dead letters, oldest first (only ``consumer``'s; only the ``newest`` ones, newest
    first, when given)."""
    sql = "SELECT id, created_ms, consumer, stream, msg_id, reason, size, raw FROM dead_letters"
    params: tuple[object, ...] = ()
    if consumer is not None:
        sql += " WHERE consumer=?"
        params = (consumer,)
    sql += " ORDER BY id" if newest is None else f" ORDER BY id DESC LIMIT {int(newest)}"
    return [DeadLetter(int(i), int(t), c, s, m, r, int(n), bytes(raw or b""))
            for i, t, c, s, m, r, n, raw in conn.execute(sql, params)]


def dead_letter_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])


def unapplied_payloads(conn: sqlite3.Connection, stream: str, consumer: str) -> list[bytes]:
    """The payloads on ``stream`` that ``consumer`` has not applied yet (still journaled)."""
    return [bytes(p) for (p,) in conn.execute(
        "SELECT m.payload FROM messages m LEFT JOIN cursors c"
        " ON c.stream = m.stream AND c.consumer = ?"
        " WHERE m.stream = ? AND m.seq > coalesce(c.seq, 0) ORDER BY m.seq",
        (consumer, stream))]


def journaled_between(conn: sqlite3.Connection, stream: str, after: int, upto: int) -> int:
    """How many of ``stream``'s messages after seq ``after`` up to ``upto`` are journaled."""
    return int(conn.execute(
        "SELECT count(*) FROM messages WHERE stream=? AND seq > ? AND seq <= ?",
        (stream, after, upto)).fetchone()[0])


def journaled_payloads(conn: sqlite3.Connection, stream: str) -> list[bytes]:
    """Every payload ``stream`` still holds (applied or not: pruning is by cursor)."""
    return [bytes(p) for (p,) in conn.execute(
        "SELECT payload FROM messages WHERE stream=? ORDER BY seq", (stream,))]
