"""The SQLite journal: outbox, per-consumer cursors, dead letters.

Every durable message is committed here before it is sent on ZeroMQ, with a
per-stream sequence number and a unique id. A consumer applies messages by
reading the journal after its durable cursor and advancing the cursor in the same
transaction as its own state change and its outputs, so a ``kill -9`` at any
instant leaves either all of an application or none of it.

Writes open with ``BEGIN IMMEDIATE`` (a deferred transaction that later writes
gets SQLITE_BUSY without waiting for the busy handler); WAL with
``synchronous=NORMAL`` keeps every commit across a process crash.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from trinity.bus.message import MAX_ID_LEN, Message
from trinity.clock import now_ms
from trinity.db import connect
from trinity.errors import InvalidPayload, JournalError

_ID_NAMESPACE = uuid.UUID("5b6f1f3e-7f0e-4d0a-9a55-1c1a2f7e9b10")
DEAD_LETTER_RAW_LIMIT = 4096


def message_id(stream: str, key: str | None) -> str:
    """A fresh id, or one derived from ``key`` so that re-publishing is a no-op."""
    if key is None:
        return uuid.uuid4().hex
    readable = f"{stream}/{key}"
    if len(readable) <= MAX_ID_LEN:
        return readable
    return f"{stream}/{uuid.uuid5(_ID_NAMESPACE, key).hex}"


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


_INSERT_MESSAGE = ("INSERT INTO messages(stream, seq, msg_id, source, created_ms, payload)"
                   " VALUES (?, ?, ?, ?, ?, ?)")
# A batch is inserted _CHUNK rows to a statement: one statement step per row (what
# executemany does) cost ~1 us more per row than the row's own insert, ~30 % of a
# journaled publish in bench-bus. The remainder of a batch goes through executemany,
# so only two statements are ever prepared.
_CHUNK = 50
_INSERT_CHUNK = _INSERT_MESSAGE + ", (?, ?, ?, ?, ?, ?)" * (_CHUNK - 1)


def _insert_messages(conn: sqlite3.Connection, messages: list[Message]) -> None:
    # A Message is a tuple of these columns in this order: it is the row.
    whole = len(messages) - len(messages) % _CHUNK
    for lo in range(0, whole, _CHUNK):
        conn.execute(_INSERT_CHUNK, tuple(chain.from_iterable(messages[lo:lo + _CHUNK])))
    if whole < len(messages):
        conn.executemany(_INSERT_MESSAGE, messages[whole:])


class Transaction:
    """One open write transaction. Published messages are sent after commit."""

    def __init__(self, conn: sqlite3.Connection, source: str,
                 max_payload_bytes: int | None = None) -> None:
        self.conn = conn
        self.source = source
        self.max_payload_bytes = max_payload_bytes
        self.published: list[Message] = []
        self._heads: dict[str, int] = {}

    def _head(self, stream: str) -> int:
        head = self._heads.get(stream)
        if head is None:
            self.conn.execute(
                "INSERT OR IGNORE INTO streams(stream, head) VALUES (?, 0)", (stream,))
            row = self.conn.execute("SELECT head FROM streams WHERE stream=?", (stream,)).fetchone()
            head = int(row[0])
            self._heads[stream] = head
        return head

    def publish(self, stream: str, payload: bytes, *, key: str | None = None) -> Message | None:
        """Journal one message; returns None if a message with the same key already exists.

        A payload over the limit raises InvalidPayload: every consumer would refuse it
        (``decode``), so it is never journaled, and the message whose handler made it is
        dead-lettered with the reason."""
        self._check_size(stream, payload)
        seq = self._head(stream) + 1
        msg = Message(
            stream=stream,
            seq=seq,
            msg_id=message_id(stream, key),
            source=self.source,
            ts_ms=now_ms(),
            payload=payload,
        )
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO messages(stream, seq, msg_id, source, created_ms, payload)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (stream, seq, msg.msg_id, msg.source, msg.ts_ms, payload),
        )
        if cur.rowcount != 1:
            return None
        self._heads[stream] = seq
        self.published.append(msg)
        return msg

    def publish_many(
        self, stream: str, items: Iterable[tuple[bytes, str | None]]
    ) -> list[Message]:
        """Journal a batch in one statement; keys already journaled (or repeated) are skipped.

        Same result as calling :meth:`publish` for each item, at a fraction of the cost.
        """
        batch = [(payload, message_id(stream, key)) for payload, key in items]
        for payload, _ in batch:
            self._check_size(stream, payload)
        if not batch:
            return []
        head, ts, source = self._head(stream), now_ms(), self.source
        # Keys are almost always new: insert the whole batch in a savepoint and only
        # look for already-journaled ids when the unique index refuses one.
        fresh = [Message(stream, seq, msg_id, source, ts, payload)
                 for seq, (payload, msg_id) in enumerate(batch, start=head + 1)]
        conn = self.conn
        conn.execute("SAVEPOINT publish_many")
        try:
            _insert_messages(conn, fresh)
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO publish_many")
            fresh = self._fresh_only(stream, batch, head, ts)
            _insert_messages(conn, fresh)
        finally:
            conn.execute("RELEASE publish_many")
        if fresh:
            self._heads[stream] = fresh[-1].seq
        self.published.extend(fresh)
        return fresh

    def _check_size(self, stream: str, payload: bytes) -> None:
        limit = self.max_payload_bytes
        if limit is not None and len(payload) > limit:
            raise InvalidPayload(f"refused to publish on {stream}: payload is {len(payload)}"
                                 f" bytes, over the {limit}-byte limit"
                                 " (TRINITY_MAX_PAYLOAD_BYTES)")

    def _fresh_only(self, stream: str, batch: list[tuple[bytes, str]], head: int,
                    ts: int) -> list[Message]:
        existing: set[str] = set()
        ids = [msg_id for _, msg_id in batch]
        for lo in range(0, len(ids), 900):
            chunk = ids[lo:lo + 900]
            marks = ",".join("?" * len(chunk))
            existing.update(row[0] for row in self.conn.execute(
                f"SELECT msg_id FROM messages WHERE msg_id IN ({marks})", chunk))
        fresh: list[Message] = []
        for payload, msg_id in batch:
            if msg_id in existing:
                continue
            existing.add(msg_id)
            head += 1
            fresh.append(Message(stream, head, msg_id, self.source, ts, payload))
        return fresh

    def advance_cursor(self, consumer: str, stream: str, seq: int) -> None:
        self.conn.execute(
            "INSERT INTO cursors(consumer, stream, seq, updated_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(consumer, stream) DO UPDATE SET seq=excluded.seq,"
            " updated_ms=excluded.updated_ms WHERE excluded.seq > cursors.seq",
            (consumer, stream, seq, now_ms()),
        )

    def dead_letter(
        self,
        consumer: str,
        reason: str,
        raw: bytes,
        *,
        stream: str | None = None,
        msg_id: str | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO dead_letters(created_ms, consumer, stream, msg_id, reason, size, raw)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now_ms(), consumer, stream, msg_id, reason, len(raw), raw[:DEAD_LETTER_RAW_LIMIT]),
        )

    def savepoint(self) -> _Savepoint:
        """Undo just this block's writes on error (the outer transaction goes on)."""
        return _Savepoint(self)

    def _flush_heads(self) -> None:
        self.conn.executemany(
            "UPDATE streams SET head=? WHERE stream=? AND head < ?",
            [(head, stream, head) for stream, head in self._heads.items()],
        )


class _Savepoint:
    """``with tx.savepoint():`` -- a class, not a generator: it runs once per applied message."""

    __slots__ = ("_tx", "_heads", "_published")

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def __enter__(self) -> None:
        tx = self._tx
        self._heads = dict(tx._heads)
        self._published = len(tx.published)
        tx.conn.execute("SAVEPOINT apply_one")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        tx = self._tx
        if exc_type is None:
            tx.conn.execute("RELEASE apply_one")
            return
        tx.conn.execute("ROLLBACK TO apply_one")
        tx.conn.execute("RELEASE apply_one")
        tx._heads = self._heads
        del tx.published[self._published:]
        # returning None: the exception propagates


class Journal:
    """One process's connection to ``trinity_messages.db``. Not shared between threads."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS streams ("
        " stream TEXT PRIMARY KEY, head INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS messages ("
        " stream TEXT NOT NULL, seq INTEGER NOT NULL, msg_id TEXT NOT NULL UNIQUE,"
        " source TEXT NOT NULL, created_ms INTEGER NOT NULL, payload BLOB NOT NULL,"
        " PRIMARY KEY (stream, seq)) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS cursors ("
        " consumer TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0,"
        " updated_ms INTEGER NOT NULL, PRIMARY KEY (consumer, stream))",
        "CREATE TABLE IF NOT EXISTS dead_letters ("
        " id INTEGER PRIMARY KEY, created_ms INTEGER NOT NULL, consumer TEXT NOT NULL,"
        " stream TEXT, msg_id TEXT, reason TEXT NOT NULL, size INTEGER NOT NULL, raw BLOB)",
    )

    def __init__(self, path: Path | str, *, source: str, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.source = source
        # Payloads over this are refused at publish (a BusNode sets it from its settings).
        self.max_payload_bytes: int | None = None
        self._busy_timeout_ms = int(busy_timeout_ms)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = connect(self.path, timeout_s=busy_timeout_ms / 1000,
                                check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self._write() as conn:
                for ddl in self.SCHEMA:
                    conn.execute(ddl)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc

    def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE``, polling for the write lock every 50 us to 0.5 ms.

        SQLite's busy handler sleeps 1, 2, 5, 10, ... ms between attempts, while
        the other writer (a publisher's or a consumer's batch) usually lets go
        well within a millisecond: with two busy processes, a fifth of their time
        went to those sleeps. So the busy timeout is off for this one statement
        (it stays on for everything else) and the lock is polled here, still up
        to ``busy_timeout_ms`` in all.
        """
        conn = self.conn
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
                        deadline = now + self._busy_timeout_ms / 1000
                    elif now > deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 0.0005)
        finally:
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._begin_immediate()
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full, I/O error) can leave the transaction open;
            # without this every later BEGIN fails and the process is wedged.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction; sqlite errors surface as JournalError."""
        tx = Transaction(self.conn, self.source, self.max_payload_bytes)
        try:
            with self._write():
                yield tx
                tx._flush_heads()
        except sqlite3.Error as exc:
            tx.published.clear()
            raise JournalError(f"journal write failed: {exc}") from exc

    def declare(self, stream: str, consumers: Iterable[str]) -> None:
        """Create the stream and a cursor at 0 for each declared consumer (idempotent).

        Declared consumers hold back pruning from the start, so a consumer that
        starts late still finds every message it has not applied.
        """
        ts = now_ms()
        with self.transaction() as tx:
            tx.conn.execute("INSERT OR IGNORE INTO streams(stream, head) VALUES (?, 0)", (stream,))
            tx.conn.executemany(
                "INSERT OR IGNORE INTO cursors(consumer, stream, seq, updated_ms)"
                " VALUES (?, ?, 0, ?)",
                [(consumer, stream, ts) for consumer in consumers],
            )

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def read_after(self, stream: str, after_seq: int, limit: int) -> list[Message]:
        rows = self._read(
            "SELECT seq, msg_id, source, created_ms, payload FROM messages"
            " WHERE stream=? AND seq>? ORDER BY seq LIMIT ?",
            (stream, after_seq, limit),
        )
        return [Message(stream, seq, mid, src, ts, bytes(p)) for seq, mid, src, ts, p in rows]

    def ids_between(self, stream: str, lo: int, hi: int) -> dict[int, str]:
        rows = self._read(
            "SELECT seq, msg_id FROM messages WHERE stream=? AND seq BETWEEN ? AND ?",
            (stream, lo, hi),
        )
        return {int(seq): str(mid) for seq, mid in rows}

    def head(self, stream: str) -> int:
        rows = self._read("SELECT head FROM streams WHERE stream=?", (stream,))
        return int(rows[0][0]) if rows else 0

    def heads(self) -> dict[str, int]:
        return {s: int(h) for s, h in self._read("SELECT stream, head FROM streams")}

    def cursor(self, consumer: str, stream: str) -> int:
        rows = self._read(
            "SELECT seq FROM cursors WHERE consumer=? AND stream=?", (consumer, stream)
        )
        return int(rows[0][0]) if rows else 0

    def backlogs(self) -> list[Backlog]:
        """Per queue and consumer: published head minus the consumer's durable cursor."""
        rows = self._read(
            "SELECT s.stream, c.consumer, s.head, c.seq FROM streams s"
            " JOIN cursors c ON c.stream = s.stream ORDER BY s.stream, c.consumer"
        )
        return [Backlog(s, c, int(h), int(q)) for s, c, h, q in rows]

    def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        sql = "SELECT id, created_ms, consumer, stream, msg_id, reason, size, raw FROM dead_letters"
        params: tuple[object, ...] = ()
        if consumer is not None:
            sql += " WHERE consumer=?"
            params = (consumer,)
        rows = self._read(sql + " ORDER BY id", params)
        return [
            DeadLetter(int(i), int(t), c, s, m, r, int(n), bytes(raw or b""))
            for i, t, c, s, m, r, n, raw in rows
        ]

    def prune(self) -> int:
        """Delete messages every consumer of their stream has applied; returns the count."""
        with self.transaction() as tx:
            cur = tx.conn.execute(
                "DELETE FROM messages WHERE seq <= ("
                " SELECT min(c.seq) FROM cursors c WHERE c.stream = messages.stream)"
            )
            return int(cur.rowcount)

    def close(self) -> None:
        self.conn.close()
