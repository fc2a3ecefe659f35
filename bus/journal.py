"""The SQLite journal, as the bus uses it: outbox, per-consumer cursors, dead letters.

Every durable message is committed here before it is sent on ZeroMQ, with a
per-stream sequence number and a unique id. A consumer applies messages by
reading the journal after its durable cursor and advancing the cursor in the same
transaction as its own state change and its outputs, so a ``kill -9`` at any
instant leaves either all of an application or none of it.

Writes open with ``BEGIN IMMEDIATE`` (a deferred transaction that later writes
gets SQLITE_BUSY without waiting for the busy handler); WAL with
``synchronous=NORMAL`` keeps every commit across a process crash.

The journal's tables and statements are its store's (``trinity.stores.journal``): this
module executes them, it names no table itself.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

from trinity.bus.message import MAX_ID_LEN, Message
from trinity.clock import now_ms
from trinity.db import begin_immediate_polling, connect, create_schema
from trinity.errors import InvalidPayload, JournalError
from trinity.stores import journal as store
from trinity.stores.journal import Backlog, DeadLetter

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


def _insert_messages(conn: sqlite3.Connection, messages: list[Message]) -> None:
    # A Message is a tuple of the messages table's columns in their order: it is the row.
    chunk = store.CHUNK
    whole = len(messages) - len(messages) % chunk
    for lo in range(0, whole, chunk):
        conn.execute(store.INSERT_CHUNK, tuple(chain.from_iterable(messages[lo:lo + chunk])))
    if whole < len(messages):
        conn.executemany(store.INSERT_MESSAGE, messages[whole:])


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
            self.conn.execute(store.DECLARE_STREAM, (stream,))
            row = self.conn.execute(store.SELECT_HEAD, (stream,)).fetchone()
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
        cur = self.conn.execute(store.INSERT_MESSAGE_ONCE, msg)
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
        step = store.MAX_IDS_PER_QUERY
        for lo in range(0, len(ids), step):
            chunk = ids[lo:lo + step]
            existing.update(row[0] for row in self.conn.execute(
                store.journaled_ids_query(len(chunk)), chunk))
        fresh: list[Message] = []
        for payload, msg_id in batch:
            if msg_id in existing:
                continue
            existing.add(msg_id)
            head += 1
            fresh.append(Message(stream, head, msg_id, self.source, ts, payload))
        return fresh

    def advance_cursor(self, consumer: str, stream: str, seq: int) -> None:
        self.conn.execute(store.ADVANCE_CURSOR, (consumer, stream, seq, now_ms()))

    def dead_letter(
        self,
        consumer: str,
        reason: str,
        raw: bytes,
        *,
        stream: str | None = None,
        msg_id: str | None = None,
    ) -> None:
        self.conn.execute(store.INSERT_DEAD_LETTER, (now_ms(), consumer, stream, msg_id, reason,
                                                     len(raw), raw[:DEAD_LETTER_RAW_LIMIT]))

    def savepoint(self) -> _Savepoint:
        """Undo just this block's writes on error (the outer transaction goes on)."""
        return _Savepoint(self)

    def _flush_heads(self) -> None:
        self.conn.executemany(store.RAISE_HEAD,
                              [(head, stream, head) for stream, head in self._heads.items()])


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
                create_schema(conn, store.DDL, store.COLUMNS)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc

    def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE``, polling for the write lock (``begin_immediate_polling``)."""
        begin_immediate_polling(self.conn, self._busy_timeout_ms)

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
            tx.conn.execute(store.DECLARE_STREAM, (stream,))
            tx.conn.executemany(store.DECLARE_CURSOR,
                                [(consumer, stream, ts) for consumer in consumers])

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def read_after(self, stream: str, after_seq: int, limit: int) -> list[Message]:
        rows = self._read(store.READ_AFTER, (stream, after_seq, limit))
        return [Message(stream, seq, mid, src, ts, bytes(p)) for seq, mid, src, ts, p in rows]

    def ids_between(self, stream: str, lo: int, hi: int) -> dict[int, str]:
        rows = self._read(store.IDS_BETWEEN, (stream, lo, hi))
        return {int(seq): str(mid) for seq, mid in rows}

    def head(self, stream: str) -> int:
        rows = self._read(store.SELECT_HEAD, (stream,))
        return int(rows[0][0]) if rows else 0

    def heads(self) -> dict[str, int]:
        return {s: int(h) for s, h in self._read(store.SELECT_HEADS)}

    def cursor(self, consumer: str, stream: str) -> int:
        rows = self._read(store.SELECT_CURSOR, (consumer, stream))
        return int(rows[0][0]) if rows else 0

    def backlogs(self) -> list[Backlog]:
        """Per queue and consumer: published head minus the consumer's durable cursor."""
        try:
            return store.backlogs(self.conn)
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        try:
            return store.dead_letters(self.conn, consumer)
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def prune(self) -> int:
        """Delete messages every consumer of their stream has applied; returns the count."""
        with self.transaction() as tx:
            cur = tx.conn.execute(store.PRUNE)
            return int(cur.rowcount)

    def close(self) -> None:
        self.conn.close()
