"""ACCEPTANCE 5 at the bus level: malformed frames are dead-lettered, never fatal.

Hypothesis generates malformed frame sets (random single frames, 2 or 4
frames, truncated envelopes, envelopes with wrong types or missing fields, bad
versions, invalid UTF-8 / non-object / oversized payloads, unknown streams...)
and a PUB socket sends them to a :class:`BusNode`'s SUB endpoint. The node must
not raise, and each message sent must become exactly one dead-letter row with
a non-empty reason. Nothing may be applied.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bus._common import ALPHA, BEATS, BETA, CONSUMER, TOPOLOGY, make_settings
from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.node import BusNode

MAX_PAYLOAD = 8192  # small, so oversized payloads stay cheap; over the 4300-digit int limit
KNOWN = (ALPHA, BETA)

# -- strategies ------------------------------------------------------------

ascii_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5), inner, max_size=3), max_leaves=6,
)


@st.composite
def envelopes(draw: st.DrawFn, stream: str | None = None) -> dict[str, Any]:
    """A valid envelope for ``stream`` (one of ours by default)."""
    return {
        "v": 1,
        "id": draw(st.text(min_size=1, max_size=40)),
        "stream": stream or draw(st.sampled_from(KNOWN)),
        "seq": draw(st.integers(min_value=1, max_value=10**6)),
        "ts_ms": draw(st.integers(min_value=0, max_value=2**42)),
        "src": draw(st.text(max_size=10)),
    }


def _frames(envelope: dict[str, Any], payload: bytes, topic: str | None = None) -> list[bytes]:
    topic = envelope["stream"] if topic is None else topic
    return [topic.encode("ascii"), json.dumps(envelope).encode(), payload]


good_payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=4).map(encode_payload)

# Values of the wrong type for each envelope field (bool is not an int here).
WRONG = {
    "v": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.none(),
                   st.integers().filter(lambda v: v != 1)),
    "id": st.one_of(st.integers(), st.none(), st.just(""), st.text(min_size=129, max_size=140),
                    st.lists(st.text(max_size=3), max_size=2)),
    "stream": st.one_of(st.integers(), st.none(), st.booleans(),
                        ascii_names.filter(lambda s: s not in KNOWN)),  # != topic
    "seq": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.none(),
                     st.integers(max_value=-1), st.just(0)),
    "ts_ms": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.none()),
    "src": st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2)),
}


@st.composite
def wrong_field(draw: st.DrawFn) -> list[bytes]:
    env = draw(envelopes())
    topic = env["stream"]
    key = draw(st.sampled_from(sorted(WRONG)))
    if draw(st.booleans()):
        del env[key]
    else:
        env[key] = draw(WRONG[key])
    return _frames(env, draw(good_payloads), topic=topic)


@st.composite
def truncated_envelope(draw: st.DrawFn) -> list[bytes]:
    env = json.dumps(draw(envelopes())).encode()
    cut = draw(st.integers(min_value=0, max_value=len(env) - 1))
    return [ALPHA.encode(), env[:cut], draw(good_payloads)]


@st.composite
def bad_payload(draw: st.DrawFn) -> list[bytes]:
    env = draw(envelopes())
    kind = draw(st.sampled_from(["utf8", "non-object", "not-json", "oversized", "huge-int"]))
    if kind == "utf8":
        good = draw(good_payloads)
        at = draw(st.integers(min_value=0, max_value=len(good)))
        payload = good[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + \
            good[at:]
    elif kind == "non-object":
        payload = json.dumps(draw(st.one_of(json_scalars, st.lists(json_values, max_size=3))))\
            .encode()
    elif kind == "not-json":
        payload = draw(st.binary(max_size=50).filter(lambda b: not _is_json_object(b)))
    elif kind == "oversized":
        size = draw(st.integers(min_value=MAX_PAYLOAD + 1, max_value=MAX_PAYLOAD + 2000))
        payload = encode_payload({"pad": "x" * size})
    else:  # a heartbeat whose "heads" number is too long for int(): once a crash
        env["stream"] = BEATS
        env["seq"] = 0
        payload = b'{"heads": {"alpha": ' + b"9" * 4400 + b"}}"
    return _frames(env, payload)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


@st.composite
def bad_topic(draw: st.DrawFn) -> list[bytes]:
    env = draw(envelopes())
    topic = draw(st.one_of(
        st.just(b""),
        st.binary(min_size=1, max_size=10).filter(lambda b: not b.isascii()),
        st.sampled_from([b"al\x00pha", b"\x01alpha", b"alpha\n"]),
    ))
    return [topic, json.dumps(env).encode(), draw(good_payloads)]


@st.composite
def unknown_stream(draw: st.DrawFn) -> list[bytes]:
    name = draw(ascii_names.filter(lambda s: s not in (*KNOWN, BEATS)))
    return _frames(draw(envelopes(stream=name)), draw(good_payloads))


@st.composite
def durable_without_seq(draw: st.DrawFn) -> list[bytes]:
    env = draw(envelopes())
    env["seq"] = 0
    return _frames(env, draw(good_payloads))


@st.composite
def not_an_object_envelope(draw: st.DrawFn) -> list[bytes]:
    value = draw(st.one_of(json_scalars, st.lists(json_values, max_size=3)))
    return [ALPHA.encode(), json.dumps(value).encode(), draw(good_payloads)]


@st.composite
def oversized_envelope(draw: st.DrawFn) -> list[bytes]:
    env = draw(envelopes())
    env["src"] = "s" * draw(st.integers(min_value=1024, max_value=3000))
    return _frames(env, draw(good_payloads))


malformed = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=1),  # random single frame
    st.lists(st.binary(max_size=64), min_size=2, max_size=2),
    st.lists(st.binary(max_size=64), min_size=4, max_size=6),
    st.builds(lambda fs, extra: [*fs, extra],  # a valid message plus a fourth frame
              envelopes().flatmap(lambda e: good_payloads.map(lambda p: _frames(e, p))),
              st.binary(max_size=8)),
    truncated_envelope(),
    wrong_field(),
    bad_payload(),
    bad_topic(),
    unknown_stream(),
    durable_without_seq(),
    not_an_object_envelope(),
    oversized_envelope(),
)


# -- the test -------------------------------------------------------------------


class Harness:
    def __init__(self, node: BusNode, journal: Journal, pub: zmq.Socket[bytes]) -> None:
        self.node, self.journal, self.pub = node, journal, pub
        self.sent = 0

    def dead_letters_after(self, last_id: int) -> list[tuple[int, str, str]]:
        return [
            (int(i), str(c), str(r))
            for i, c, r in self.journal.conn.execute(
                "SELECT id, consumer, reason FROM dead_letters WHERE id > ? ORDER BY id",
                (last_id,),
            )
        ]

    def settle(self) -> None:
        """Consume leftovers of an earlier (failed) example, so each example starts clean."""
        while True:
            try:
                if not self.node.receive(timeout_ms=10):
                    break
            except Exception:  # noqa: BLE001 - already reported by the example that sent it
                continue
        self.node.ephemeral_inbox.clear()

    def last_id(self) -> int:
        row = self.journal.conn.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()
        return int(row[0])


def _never(msg: Message, tx: Transaction) -> None:
    raise AssertionError(f"a malformed message was applied: {msg}")


@pytest.fixture
def harness(
    bus_data_dir: Any, bus_run_dir: Any, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[Harness]:
    bus_settings = make_settings(bus_data_dir, bus_run_dir, max_payload_bytes=MAX_PAYLOAD)
    journal = Journal(bus_settings.messages_db, source=CONSUMER)
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx,
                   rcvhwm=100_000)
    pub = zmq_ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        assert node.endpoint is not None
        pub.connect(node.endpoint)
        # Slow joiner: the SUB side attaches our connection only when its thread
        # calls into the socket, so probe until a well-formed heartbeat arrives.
        probe = Message(BEATS, 0, "probe", "fuzz", 0, encode_payload({"probe": True}))
        deadline = time.monotonic() + 10
        while not node.ephemeral_inbox:
            assert time.monotonic() < deadline, "the probe never arrived"
            pub.send_multipart(probe.frames())
            node.receive(timeout_ms=20)
        time.sleep(0.05)
        node.receive(timeout_ms=20)  # the rest of the probes
        node.ephemeral_inbox.clear()
        assert journal.dead_letters() == []
        yield Harness(node, journal, pub)
    finally:
        pub.close(0)
        node.close()
        journal.close()


def test_malformed_frames_are_dead_lettered_one_row_each(harness: Harness) -> None:
    node = harness.node

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(malformed, min_size=1, max_size=8))
    def check(batch: list[list[bytes]]) -> None:
        harness.settle()  # a failed example may have left frames behind
        before = harness.last_id()
        received = node.counters.received
        for frames in batch:
            harness.pub.send_multipart(frames)
        deadline = time.monotonic() + 5
        while node.counters.received < received + len(batch):
            assert time.monotonic() < deadline, (
                f"only {node.counters.received - received} of {len(batch)} arrived"
            )
            node.receive(timeout_ms=50)  # must not raise, whatever arrives
        node.drain(_never)
        assert node.counters.received == received + len(batch)
        letters = harness.dead_letters_after(before)
        assert len(letters) == len(batch), (
            f"{len(batch)} sent, {len(letters)} dead-lettered: {[r for _, _, r in letters]}"
        )
        assert all(c == CONSUMER and r.strip() for _, c, r in letters)
        assert node.ephemeral_inbox == []

    check()
    assert node.counters.applied == 0
    assert node.backlog() == 0
