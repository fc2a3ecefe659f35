"""Unit tests of the journal (``bus/journal.py``) and of wire validation (``bus/message.py``)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bus._common import ALPHA, BETA, CONSUMER, TOPOLOGY
from tests.conftest import hold_write_lock
from trinity.bus.config import BusConfig
from trinity.bus.journal import DEAD_LETTER_RAW_LIMIT, Journal, Transaction, message_id
from trinity.bus.message import (
    ENVELOPE_VERSION,
    MAX_ENVELOPE_BYTES,
    Message,
    decode,
    encode_payload,
)
from trinity.bus.node import BusNode
from trinity.errors import InvalidPayload, JournalError, MalformedMessage
from trinity.settings import Settings

MAX_PAYLOAD = 1024


def _payload(i: int) -> bytes:
    return encode_payload({"i": i})


def _seqs(journal: Journal, stream: str) -> list[int]:
    return [m.seq for m in journal.read_after(stream, 0, 1_000_000)]


# -- sequence numbers ------------------------------------------------------


def test_per_stream_seq_is_contiguous_across_transactions_and_streams(journal: Journal) -> None:
    for batch in range(5):
        with journal.transaction() as tx:
            for i in range(7):
                # Interleave the streams inside one transaction.
                a = tx.publish(ALPHA, _payload(batch * 7 + i))
                b = tx.publish(BETA, _payload(batch * 7 + i))
                assert a is not None and b is not None
        assert [m.seq for m in tx.published if m.stream == ALPHA] == list(
            range(batch * 7 + 1, batch * 7 + 8)
        )
    assert _seqs(journal, ALPHA) == list(range(1, 36))
    assert _seqs(journal, BETA) == list(range(1, 36))
    assert journal.heads() == {ALPHA: 35, BETA: 35}


def test_seq_continues_after_reopening_the_journal(bus_settings: Settings) -> None:
    first = Journal(bus_settings.messages_db, source="one")
    try:
        with first.transaction() as tx:
            tx.publish(ALPHA, _payload(0))
            tx.publish(ALPHA, _payload(1))
    finally:
        first.close()
    second = Journal(bus_settings.messages_db, source="two")
    try:
        with second.transaction() as tx:
            msg = tx.publish(ALPHA, _payload(2))
        assert msg is not None and msg.seq == 3
        assert _seqs(second, ALPHA) == [1, 2, 3]
    finally:
        second.close()


def test_rolled_back_transaction_leaves_no_gap(journal: Journal) -> None:
    with pytest.raises(RuntimeError), journal.transaction() as tx:
        tx.publish(ALPHA, _payload(0))
        raise RuntimeError("abort")
    with journal.transaction() as tx:
        msg = tx.publish(ALPHA, _payload(1))
    assert msg is not None and msg.seq == 1
    assert journal.head(ALPHA) == 1


# -- idempotent publishing ------------------------------------------------


def test_keyed_publish_is_idempotent(journal: Journal) -> None:
    with journal.transaction() as tx:
        first = tx.publish(ALPHA, _payload(1), key="event-1")
        again = tx.publish(ALPHA, _payload(2), key="event-1")
    assert first is not None and first.msg_id == f"{ALPHA}/event-1"
    assert again is None
    assert [m.msg_id for m in tx.published] == [first.msg_id]
    # A later transaction (e.g. a restarted publisher) is a no-op too.
    with journal.transaction() as tx:
        assert tx.publish(ALPHA, _payload(3), key="event-1") is None
        nxt = tx.publish(ALPHA, _payload(4), key="event-2")
    assert tx.published == [nxt]
    assert nxt is not None and nxt.seq == 2  # the ignored duplicates used no seq
    rows = journal.read_after(ALPHA, 0, 100)
    assert [(m.seq, m.msg_id, m.payload) for m in rows] == [
        (1, f"{ALPHA}/event-1", _payload(1)),
        (2, f"{ALPHA}/event-2", _payload(4)),
    ]
    assert journal.head(ALPHA) == 2


def test_same_key_on_two_streams_is_two_messages(journal: Journal) -> None:
    with journal.transaction() as tx:
        a = tx.publish(ALPHA, _payload(1), key="k")
        b = tx.publish(BETA, _payload(1), key="k")
    assert a is not None and b is not None and a.msg_id != b.msg_id


def test_long_keys_get_a_stable_bounded_id(journal: Journal) -> None:
    key = "x" * 500
    assert message_id(ALPHA, key) == message_id(ALPHA, key)
    assert len(message_id(ALPHA, key)) <= 128
    with journal.transaction() as tx:
        assert tx.publish(ALPHA, _payload(1), key=key) is not None
        assert tx.publish(ALPHA, _payload(1), key=key) is None
    assert message_id(ALPHA, None) != message_id(ALPHA, None)


# -- cursors, backlog, pruning ----------------------------------------------


def _publish_n(journal: Journal, stream: str, n: int) -> None:
    with journal.transaction() as tx:
        for i in range(n):
            tx.publish(stream, _payload(i))


def _advance(journal: Journal, consumer: str, stream: str, seq: int) -> None:
    with journal.transaction() as tx:
        tx.advance_cursor(consumer, stream, seq)


def test_backlog_is_head_minus_cursor(journal: Journal) -> None:
    journal.declare(ALPHA, ["c1", "c2"])
    journal.declare(BETA, ["c1"])
    _publish_n(journal, ALPHA, 10)
    _publish_n(journal, BETA, 3)
    _advance(journal, "c1", ALPHA, 4)
    _advance(journal, "c1", BETA, 3)
    backlog = {(b.stream, b.consumer): (b.head, b.cursor, b.pending) for b in journal.backlogs()}
    assert backlog == {
        (ALPHA, "c1"): (10, 4, 6),
        (ALPHA, "c2"): (10, 0, 10),
        (BETA, "c1"): (3, 3, 0),
    }


def test_cursor_never_moves_backwards(journal: Journal) -> None:
    journal.declare(ALPHA, ["c1"])
    _publish_n(journal, ALPHA, 10)
    _advance(journal, "c1", ALPHA, 8)
    _advance(journal, "c1", ALPHA, 5)
    assert journal.cursor("c1", ALPHA) == 8
    journal.declare(ALPHA, ["c1"])  # re-declaring does not reset a cursor
    assert journal.cursor("c1", ALPHA) == 8


def test_prune_deletes_only_below_the_lowest_declared_cursor(journal: Journal) -> None:
    journal.declare(ALPHA, ["c1", "c2"])
    journal.declare(BETA, ["c1", "late"])  # "late" has never run: its cursor is 0
    _publish_n(journal, ALPHA, 10)
    _publish_n(journal, BETA, 10)
    _advance(journal, "c1", ALPHA, 7)
    _advance(journal, "c2", ALPHA, 3)
    _advance(journal, "c1", BETA, 10)

    assert journal.prune() == 3
    assert _seqs(journal, ALPHA) == list(range(4, 11))
    assert _seqs(journal, BETA) == list(range(1, 11))  # held back by the late consumer
    assert journal.prune() == 0
    # Heads survive pruning: the next message continues the sequence.
    assert journal.head(ALPHA) == 10
    with journal.transaction() as tx:
        msg = tx.publish(ALPHA, _payload(99))
    assert msg is not None and msg.seq == 11

    _advance(journal, "c2", ALPHA, 11)
    assert journal.prune() == 4  # 4..7: c1 is still at 7
    assert _seqs(journal, ALPHA) == [8, 9, 10, 11]


# -- dead letters -------------------------------------------------------------


def test_dead_letters_are_stored_with_their_reason(journal: Journal) -> None:
    big = b"z" * (DEAD_LETTER_RAW_LIMIT + 100)
    with journal.transaction() as tx:
        tx.dead_letter("c1", "payload is not valid UTF-8 (byte 0)", b"\xff\xfe")
        tx.dead_letter("c2", "handler error: boom", big, stream=ALPHA, msg_id="alpha/1")
    letters = journal.dead_letters()
    assert [(d.consumer, d.reason, d.stream, d.msg_id) for d in letters] == [
        ("c1", "payload is not valid UTF-8 (byte 0)", None, None),
        ("c2", "handler error: boom", ALPHA, "alpha/1"),
    ]
    assert letters[0].raw == b"\xff\xfe" and letters[0].size == 2
    assert letters[1].size == len(big)  # the full size is recorded ...
    assert letters[1].raw == big[:DEAD_LETTER_RAW_LIMIT]  # ... the raw bytes are capped
    assert [d.reason for d in journal.dead_letters("c2")] == ["handler error: boom"]
    assert all(d.created_ms > 0 for d in letters)


# -- savepoints ---------------------------------------------------------------


def test_savepoint_rolls_back_only_the_failing_block(journal: Journal) -> None:
    journal.conn.execute("CREATE TABLE state (k TEXT)")
    with journal.transaction() as tx:
        with tx.savepoint():
            tx.conn.execute("INSERT INTO state VALUES ('first')")
            first = tx.publish(ALPHA, _payload(1))
        with pytest.raises(ValueError), tx.savepoint():
            tx.conn.execute("INSERT INTO state VALUES ('failing')")
            tx.publish(ALPHA, _payload(2))
            raise ValueError("handler failed")
        with tx.savepoint():
            tx.conn.execute("INSERT INTO state VALUES ('third')")
            third = tx.publish(ALPHA, _payload(3))
    assert [r[0] for r in journal.conn.execute("SELECT k FROM state ORDER BY rowid")] == [
        "first",
        "third",
    ]
    # The failing block's publish is gone from the journal and from the send list,
    # and its seq was reused: no gap.
    assert tx.published == [first, third]
    assert first is not None and third is not None and (first.seq, third.seq) == (1, 2)
    assert [m.payload for m in journal.read_after(ALPHA, 0, 10)] == [_payload(1), _payload(3)]
    assert journal.head(ALPHA) == 2


def test_node_rolls_back_a_failing_message_and_dead_letters_it(
    bus_settings: Settings, journal: Journal, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A handler that raises loses its own writes only; the batch and cursor go on."""
    journal.conn.execute("CREATE TABLE state (i INTEGER)")
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx)
    try:
        with journal.transaction() as tx:
            for i in range(5):
                tx.publish(ALPHA, _payload(i))

        def handler(msg: Message, tx: Transaction) -> None:
            i = json.loads(msg.payload)["i"]
            tx.conn.execute("INSERT INTO state VALUES (?)", (i,))
            if i == 2:
                raise KeyError("no such thing")

        assert node.drain(handler) == 5
    finally:
        node.close()
    assert [r[0] for r in journal.conn.execute("SELECT i FROM state ORDER BY rowid")] == [
        0, 1, 3, 4,
    ]
    assert journal.cursor(CONSUMER, ALPHA) == 5
    letters = journal.dead_letters(CONSUMER)
    assert len(letters) == 1
    assert letters[0].stream == ALPHA and letters[0].msg_id is not None
    assert letters[0].reason.startswith("handler error: KeyError")
    assert node.counters.applied == 4 and node.counters.dead_lettered == 1


@pytest.mark.parametrize("isolate_each", [True, False])
def test_unisolated_batches_give_the_same_result_as_isolated_ones(
    bus_settings: Settings, journal: Journal, zmq_ctx: zmq.Context[zmq.Socket[bytes]],
    isolate_each: bool,
) -> None:
    """Without per-message savepoints a failing batch is re-run isolated: same writes, once."""
    journal.conn.execute("CREATE TABLE state (i INTEGER)")
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx,
                   isolate_each=isolate_each)
    calls: list[int] = []
    try:
        with journal.transaction() as tx:
            for i in range(6):
                tx.publish(ALPHA, _payload(i))

        def handler(msg: Message, tx: Transaction) -> None:
            i = json.loads(msg.payload)["i"]
            calls.append(i)
            tx.conn.execute("INSERT INTO state VALUES (?)", (i,))
            tx.publish("outputs", _payload(i), key=f"out-{i}")
            if i == 3:
                raise InvalidPayload("three is not allowed")

        assert node.drain(handler) == 6
    finally:
        node.close()
    assert [r[0] for r in journal.conn.execute("SELECT i FROM state ORDER BY rowid")] == [
        0, 1, 2, 4, 5,
    ]
    assert [json.loads(m.payload)["i"] for m in journal.read_after("outputs", 0, 100)] == [
        0, 1, 2, 4, 5,
    ]
    assert journal.cursor(CONSUMER, ALPHA) == 6
    assert [d.reason for d in journal.dead_letters(CONSUMER)] == ["three is not allowed"]
    # The unisolated pass ran 0..3 before failing; the isolated pass ran all six.
    assert calls == ([0, 1, 2, 3, 4, 5] if isolate_each else [0, 1, 2, 3, 0, 1, 2, 3, 4, 5])


# -- a failed COMMIT must not leave the connection inside a transaction --------


class _FailingCommit:
    """Wraps a connection; the next COMMIT fails as a full disk would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.armed = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_failed_commit_is_rolled_back_and_the_journal_stays_usable(journal: Journal) -> None:
    real = journal.conn
    journal.conn = _FailingCommit(real)  # type: ignore[assignment]
    try:
        with pytest.raises(JournalError), journal.transaction() as tx:
            tx.publish(ALPHA, _payload(1))
        assert tx.published == []
        assert not real.in_transaction
        with journal.transaction() as tx:
            msg = tx.publish(ALPHA, _payload(2))
    finally:
        journal.conn = real
    assert msg is not None and msg.seq == 1
    assert [m.payload for m in journal.read_after(ALPHA, 0, 10)] == [_payload(2)]


# -- waiting for the write lock -------------------------------------------------


def test_transaction_waits_for_another_writer(journal: Journal, bus_settings: Settings) -> None:
    holder = hold_write_lock(bus_settings.messages_db, 0.15)
    start = time.monotonic()
    with journal.transaction() as tx:
        tx.publish(ALPHA, _payload(1))
    waited = time.monotonic() - start
    holder.join()
    assert 0.1 < waited < 2.0
    assert journal.head(ALPHA) == 1
    # The busy timeout for every other statement is back to the configured value.
    assert journal.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000


def test_transaction_gives_up_after_the_busy_timeout(bus_settings: Settings) -> None:
    journal = Journal(bus_settings.messages_db, source="impatient", busy_timeout_ms=200)
    try:
        holder = hold_write_lock(bus_settings.messages_db, 1.0)
        start = time.monotonic()
        with pytest.raises(JournalError, match="locked"), journal.transaction() as tx:
            tx.publish(ALPHA, _payload(1))
        waited = time.monotonic() - start
        holder.join()
        assert 0.15 < waited < 0.9
        assert not journal.conn.in_transaction
        assert journal.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 200
        with journal.transaction() as tx:  # usable again once the lock is free
            tx.publish(ALPHA, _payload(2))
        assert journal.head(ALPHA) == 1
    finally:
        journal.close()


# -- wire validation: message.decode -----------------------------------------


def _envelope(**changes: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "v": ENVELOPE_VERSION, "id": "alpha/1", "stream": ALPHA, "seq": 1, "ts_ms": 1, "src": "p",
    }
    for key, value in changes.items():
        if value is _MISSING:
            del env[key]
        else:
            env[key] = value
    return env


_MISSING = object()


def _frames(topic: bytes = b"alpha", payload: bytes = b'{"i":1}', **changes: Any) -> list[bytes]:
    return [topic, json.dumps(_envelope(**changes)).encode(), payload]


def test_decode_accepts_a_well_formed_message() -> None:
    msg = Message(ALPHA, 7, "alpha/7", "p", 123, b'{"i":7}')
    assert decode(msg.frames(), MAX_PAYLOAD) == msg


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        pytest.param([b"alpha"], "expected 3 frames", id="one-frame"),
        pytest.param([b"alpha", b"{}"], "expected 3 frames", id="two-frames"),
        pytest.param([*_frames(), b"extra"], "expected 3 frames", id="four-frames"),
        pytest.param(_frames(topic=b""), "topic is empty", id="empty-topic"),
        pytest.param(_frames(topic=b"al\xffpha"), "topic is not ASCII", id="non-ascii-topic"),
        pytest.param(_frames(topic=b"al\x00pha"), "not printable", id="unprintable-topic"),
        pytest.param([b"alpha", b'{"v": 1, "id": ', b"{}"], "envelope is not valid UTF-8 JSON",
                     id="truncated-envelope"),
        pytest.param([b"alpha", b"\xff\xfe", b"{}"], "envelope is not valid UTF-8 JSON",
                     id="envelope-not-utf8"),
        pytest.param([b"alpha", b"[1, 2]", b"{}"], "envelope must be a JSON object, got list",
                     id="envelope-not-object"),
        pytest.param([b"alpha", b" " * (MAX_ENVELOPE_BYTES + 1), b"{}"],
                     f"over the {MAX_ENVELOPE_BYTES}-byte limit", id="envelope-too-big"),
        pytest.param(_frames(v=2), "unsupported envelope version 2", id="bad-version"),
        pytest.param(_frames(v="1"), "field 'v' must be an integer, got str", id="version-str"),
        pytest.param(_frames(v=True), "field 'v' must be an integer, got bool", id="version-bool"),
        pytest.param(_frames(seq=True), "field 'seq' must be an integer, got bool",
                     id="seq-bool"),
        pytest.param(_frames(seq=1.5), "field 'seq' must be an integer, got float",
                     id="seq-float"),
        pytest.param(_frames(seq="1"), "field 'seq' must be an integer, got str", id="seq-str"),
        pytest.param(_frames(seq=-1), "sequence number must be >= 0", id="seq-negative"),
        pytest.param(_frames(ts_ms=None), "field 'ts_ms' must be an integer, got NoneType",
                     id="ts-null"),
        pytest.param(_frames(id=5), "field 'id' must be a string, got int", id="id-int"),
        pytest.param(_frames(id=""), "message id must be 1..128 characters", id="id-empty"),
        pytest.param(_frames(id="x" * 129), "message id must be 1..128 characters",
                     id="id-too-long"),
        pytest.param(_frames(src=["p"]), "field 'src' must be a string, got list", id="src-list"),
        pytest.param(_frames(seq=_MISSING), "envelope is missing 'seq'", id="seq-missing"),
        pytest.param(_frames(stream=_MISSING), "envelope is missing 'stream'",
                     id="stream-missing"),
        pytest.param(_frames(stream="beta"), "envelope stream 'beta' does not match topic 'alpha'",
                     id="stream-topic-mismatch"),
        pytest.param(_frames(payload=b"{}" + b" " * MAX_PAYLOAD),
                     f"payload is {MAX_PAYLOAD + 2} bytes, over the {MAX_PAYLOAD}-byte limit",
                     id="payload-too-big"),
        pytest.param(_frames(payload=b'{"a": "\xff"}'), "payload is not valid UTF-8 (byte 7)",
                     id="payload-not-utf8"),
        pytest.param(_frames(payload=b'{"a": '), "payload is not valid JSON",
                     id="payload-truncated"),
        pytest.param(_frames(payload=b"[1, 2]"), "payload must be a JSON object, got list",
                     id="payload-list"),
        pytest.param(_frames(payload=b"null"), "payload must be a JSON object, got NoneType",
                     id="payload-null"),
    ],
)
def test_decode_rejects_malformed_frames_with_a_specific_reason(
    frames: list[bytes], reason: str
) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(frames, MAX_PAYLOAD)
    assert reason in info.value.reason


def test_decode_rejects_an_integer_too_long_to_convert() -> None:
    """Python refuses ints over 4300 digits with ValueError, not JSONDecodeError."""
    frames = _frames(payload=b'{"heads": {"alpha": ' + b"1" * 5000 + b"}}")
    with pytest.raises(MalformedMessage, match="payload is not valid JSON"):
        decode(frames, 1 << 20)


def test_decode_payload_limit_is_the_callers() -> None:
    frames = _frames(payload=encode_payload({"pad": "x" * 2000}))
    with pytest.raises(MalformedMessage, match="over the 1024-byte limit"):
        decode(frames, 1024)
    assert decode(frames, 4096).seq == 1


@given(
    msg_id=st.text(min_size=1, max_size=128),
    source=st.text(max_size=40),
    seq=st.integers(min_value=0, max_value=2**62),
    ts_ms=st.integers(min_value=-(2**62), max_value=2**62),
)
@settings(max_examples=300, deadline=None, database=None)
def test_envelope_bytes_equal_json_dumps_and_round_trip(
    msg_id: str, source: str, seq: int, ts_ms: int
) -> None:
    """frames() formats the envelope by hand for speed; it must be json.dumps' output."""
    msg = Message(ALPHA, seq, msg_id, source, ts_ms, b'{"i":1}')
    envelope = {"v": 1, "id": msg_id, "stream": ALPHA, "seq": seq, "ts_ms": ts_ms, "src": source}
    frames = msg.frames()
    assert frames[1] == json.dumps(envelope, separators=(",", ":")).encode()
    if len(frames[1]) <= MAX_ENVELOPE_BYTES:
        assert decode(frames, MAX_PAYLOAD) == msg


@given(payload=st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)))
@settings(max_examples=200, deadline=None, database=None)
def test_encode_payload_is_compact_utf8_json(payload: dict[str, Any]) -> None:
    raw = encode_payload(payload)
    assert raw == json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert json.loads(raw) == payload


# -- publish_many: one statement per batch, same result as publish() per item ----------------


@settings(max_examples=60, deadline=None)
@given(
    earlier=st.lists(st.sampled_from("abcdefgh"), max_size=5),
    # Up to 130 items: batches of whole 50-row insert statements, a remainder, and
    # repeats that the unique index refuses inside a chunk.
    batches=st.lists(st.lists(st.one_of(st.none(), st.sampled_from("abcdefghij"),
                                        st.integers(0, 400).map(str)), max_size=130),
                     min_size=1, max_size=4),
)
def test_publish_many_matches_publish_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, earlier: list[str], batches: list[list[str | None]],
) -> None:
    """Repeated keys, keys journaled earlier and keyless items: the batch path skips and
    numbers exactly as publishing each item would (ids of keyless items are random)."""
    base = tmp_path_factory.mktemp("many")
    one, many = Journal(base / "one.db", source="p"), Journal(base / "many.db", source="p")
    try:
        for journal in (one, many):
            with journal.transaction() as tx:
                for key in earlier:
                    tx.publish(ALPHA, _payload(-1), key=key)
        n = 0
        for keys in batches:
            items = []
            for key in keys:
                items.append((_payload(n), key))
                n += 1
            with one.transaction() as tx_one:
                singles = [tx_one.publish(ALPHA, payload, key=key) for payload, key in items]
            with many.transaction() as tx_many:
                batch = tx_many.publish_many(ALPHA, items)
            assert batch == tx_many.published
            expected = [m for m in singles if m is not None]
            assert [(m.seq, m.payload) for m in batch] == [(m.seq, m.payload) for m in expected]
            assert [m.msg_id for m in batch if m.msg_id.count("/")] == [
                m.msg_id for m in expected if m.msg_id.count("/")]

        def rows(journal: Journal) -> list[tuple[Any, ...]]:
            return journal.conn.execute(
                "SELECT seq, payload FROM messages WHERE stream=? ORDER BY seq", (ALPHA,)
            ).fetchall()

        assert rows(many) == rows(one)
        assert many.heads() == one.heads()
    finally:
        one.close()
        many.close()


def test_publish_many_inserts_whole_chunks_and_the_remainder(journal: Journal) -> None:
    # The insert binds each Message as its row: its fields are the columns, in order.
    assert Message._fields == ("stream", "seq", "msg_id", "source", "ts_ms", "payload")
    with journal.transaction() as tx:
        tx.publish(ALPHA, _payload(0), key="k0")
        batch = tx.publish_many(ALPHA, [(_payload(i), f"k{i}") for i in range(1, 124)])
    assert [m.seq for m in batch] == list(range(2, 125))
    stored = journal.read_after(ALPHA, 0, 1000)
    assert [(m.seq, m.msg_id, m.payload) for m in stored] == [
        (i + 1, f"{ALPHA}/k{i}", _payload(i)) for i in range(124)]
    assert journal.head(ALPHA) == 124


def test_publish_many_that_fails_midway_leaves_the_transaction_usable(journal: Journal) -> None:
    with journal.transaction() as tx:
        tx.publish(ALPHA, _payload(0), key="k0")
        tx.publish_many(ALPHA, [(_payload(1), "k1"), (_payload(2), "k0"), (_payload(3), "k3")])
        tx.publish(ALPHA, _payload(4), key="k4")
    stored = journal.read_after(ALPHA, 0, 100)
    assert [(m.seq, m.msg_id) for m in stored] == [
        (1, f"{ALPHA}/k0"), (2, f"{ALPHA}/k1"), (3, f"{ALPHA}/k3"), (4, f"{ALPHA}/k4")]


def test_an_oversized_output_is_refused_at_publish_and_its_input_dead_lettered(
    bus_settings: Settings, journal: Journal, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """What every consumer would refuse is never journaled: the message whose handler
    made it is dead-lettered with the reason, the others go on."""
    limit = bus_settings.max_payload_bytes
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx,
                   isolate_each=False)
    try:
        with journal.transaction() as tx:
            for i in range(3):
                tx.publish(ALPHA, _payload(i))

        def handler(msg: Message, tx: Transaction) -> None:
            i = json.loads(msg.payload)["i"]
            size = limit + 1 if i == 1 else 10
            tx.publish("outputs", b"x" * size, key=f"out-{i}")
            tx.publish_many("more", [(b"y" * size, f"more-{i}")])

        assert node.drain(handler) == 3
    finally:
        node.close()
    assert [m.payload for m in journal.read_after("outputs", 0, 10)] == [b"x" * 10] * 2
    assert len(journal.read_after("more", 0, 10)) == 2
    [letter] = journal.dead_letters(CONSUMER)
    assert json.loads(letter.raw)["i"] == 1
    assert letter.reason == (f"refused to publish on outputs: payload is {limit + 1} bytes,"
                             f" over the {limit}-byte limit (TRINITY_MAX_PAYLOAD_BYTES)")
