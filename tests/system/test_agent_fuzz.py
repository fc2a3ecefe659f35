"""Fuzzing each agent's inbound socket, and rejected payloads in the journal.

Acceptance: random bytes, truncated envelopes, wrong types and oversized payloads
sent to each agent's socket crash nothing; each shows up as a dead-letter record
with a reason. A journaled message whose payload the agent rejects is
dead-lettered with a reason naming the problem and the agent carries on.

Every test runs the real agent process (``python -m trinity.cli agent NAME``) and
stops it with SIGTERM, which must give exit status 0.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trinity.bus.journal import DeadLetter, Journal
from trinity.bus.message import MAX_ENVELOPE_BYTES, MAX_ID_LEN, Message, encode_payload
from trinity.contract import EXECUTION, IMPROVEMENT, TELEMETRY, TOPOLOGY

AGENTS = {"witness": TELEMETRY, "architect": IMPROVEMENT, "executor": EXECUTION}
MAX_PAYLOAD = 1 << 20  # the agents run with the default TRINITY_MAX_PAYLOAD_BYTES
KNOWN_STREAMS = frozenset(TOPOLOGY.consumers)
WAIT_S = 10.0
MODEL_WAIT_S = 90.0


def _wait(predicate: Callable[[], Any], what: str, proc: subprocess.Popen[bytes] | None = None,
          timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"agent exited with status {proc.returncode} while waiting for {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


class Agent:
    """One real agent process in a short /tmp folder, plus a journal connection to inspect it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stream = AGENTS[name]
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="tr"))
        self.run_dir = self.root / "run"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
        self.env.update(TRINITY_DATA_DIR=str(self.root), TRINITY_RUN_DIR=str(self.run_dir))
        self.endpoint = f"ipc://{self.run_dir}/{name}.sock"
        self.stderr_path = self.root / f"{name}.stderr"
        self.journal: Journal | None = None
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trinity.cli", "agent", name],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr,
            )
        try:
            # The journal exists before the socket is bound (BaseProcess.initialize).
            _wait((self.run_dir / f"{name}.sock").exists, f"{name} to bind its socket", self.proc)
            self.journal = Journal(self.root / "trinity_messages.db", source="test")
        except BaseException:
            self.kill()
            raise

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def dead_letter_count(self) -> int:
        assert self.journal is not None
        row = self.journal.conn.execute(
            "SELECT count(*) FROM dead_letters WHERE consumer=?", (self.name,)).fetchone()
        return int(row[0])

    def dead_letters(self) -> list[DeadLetter]:
        assert self.journal is not None
        return self.journal.dead_letters(self.name)

    def stop(self) -> int:
        """SIGTERM, wait, release everything; returns the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                pytest.fail(f"{self.name} did not exit within 10 s of SIGTERM")
        finally:
            self._release()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._release()

    def _release(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _assert_clean_exit(agent: Agent) -> None:
    code = agent.stop()
    log = agent.stderr
    assert code == 0, f"{agent.name} exited with {code} on SIGTERM; stderr:\n{log[-4000:]}"
    assert "Traceback" not in log, f"{agent.name} logged a traceback:\n{log[-4000:]}"
    assert f"{agent.name} stopped cleanly" in log


# -- wire fuzzing ------------------------------------------------------------------

class FuzzedAgent:
    """A running agent with a PUB socket attached to its SUB endpoint."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pub: zmq.Socket[bytes] = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.connect(agent.endpoint)
        # PUB drops what it sends before the peer is attached: probe until one lands.
        before = agent.dead_letter_count()
        deadline = time.monotonic() + WAIT_S
        while agent.dead_letter_count() == before:
            if time.monotonic() > deadline or not agent.alive():
                self.close()
                pytest.fail(f"no probe reached {agent.name} within {WAIT_S} s")
            self.pub.send_multipart([b"probe"])
            time.sleep(0.1)
        time.sleep(0.3)  # let late probes land before any test takes its baseline

    def close(self) -> None:
        self.pub.close(0)
        self.ctx.term()


@pytest.fixture(scope="module", params=sorted(AGENTS))
def fuzzed(request: pytest.FixtureRequest) -> Iterator[FuzzedAgent]:
    agent = Agent(request.param)
    try:
        target = FuzzedAgent(agent)
    except BaseException:
        agent.kill()
        agent.cleanup()
        raise
    try:
        yield target
    finally:
        target.close()
        try:
            _assert_clean_exit(agent)  # a clean SIGTERM exit after the fuzzing is required
        finally:
            agent.cleanup()


Expected = tuple[str, ...]  # the reason must contain one of these; () accepts any reason


@dataclass
class Parts:
    """A well-formed frame set for ``stream`` with a fresh id and seq, for a case to spoil."""

    stream: str
    msg_id: str
    seq: int

    def __post_init__(self) -> None:
        self.topic = self.stream.encode()
        self.env: dict[str, Any] = {"v": 1, "id": self.msg_id, "stream": self.stream,
                                    "seq": self.seq, "ts_ms": 1, "src": "fuzz"}
        self.payload = b'{"message":"x","event_id":"e","task_id":"t","delegate":"d"}'

    def envelope(self) -> bytes:
        return json.dumps(self.env, separators=(",", ":")).encode()

    def frames(self) -> list[bytes]:
        return [self.topic, self.envelope(), self.payload]

    @property
    def not_journaled(self) -> str:
        return f"{self.stream} seq {self.seq} (id {self.msg_id!r}) is not in the journal"


def _set(p: Parts, **fields: Any) -> Parts:
    p.env.update(fields)
    return p


def _unless_oversized(frames: list[bytes], reason: str) -> tuple[list[bytes], Expected]:
    """Generated JSON can push a valid topic's envelope over the limit, checked first."""
    if len(frames[1]) > MAX_ENVELOPE_BYTES:
        return frames, (f"over the {MAX_ENVELOPE_BYTES}-byte limit",)
    return frames, (reason,)


def _frames_wrong_count(a: list[bytes], p: Parts) -> tuple[list[bytes], Expected]:
    return list(a), (f"expected 3 frames [topic, envelope, payload], got {len(a)}",)


def _truncated(a: int, p: Parts) -> tuple[list[bytes], Expected]:
    raw = p.envelope()
    return [p.topic, raw[: a % len(raw)], p.payload], ("envelope is not valid UTF-8 JSON",)


def _garbage_envelope(a: bytes, p: Parts) -> tuple[list[bytes], Expected]:
    return [p.topic, a, p.payload], ()


def _non_object_envelope(a: Any, p: Parts) -> tuple[list[bytes], Expected]:
    return _unless_oversized([p.topic, json.dumps(a).encode(), p.payload],
                             "envelope must be a JSON object")


def _wrong_type(a: tuple[str, Any], p: Parts) -> tuple[list[bytes], Expected]:
    return _unless_oversized(_set(p, **{a[0]: a[1]}).frames(), f"envelope field {a[0]!r} must be")


def _missing(a: str, p: Parts) -> tuple[list[bytes], Expected]:
    del p.env[a]
    return p.frames(), (f"envelope is missing {a!r}",)


def _negative_seq(a: int, p: Parts) -> tuple[list[bytes], Expected]:
    return _set(p, seq=a).frames(), (f"sequence number must be >= 0, got {a}",)


def _bad_version(a: int, p: Parts) -> tuple[list[bytes], Expected]:
    return _set(p, v=a).frames(), (f"unsupported envelope version {a}",)


def _bad_id(a: int, p: Parts) -> tuple[list[bytes], Expected]:
    return _set(p, id="i" * a).frames(), (f"message id must be 1..{MAX_ID_LEN} characters",)


def _mismatch(a: str, p: Parts) -> tuple[list[bytes], Expected]:
    return _unless_oversized(_set(p, stream=a).frames(), "does not match topic")


def _bad_topic(a: bytes, p: Parts) -> tuple[list[bytes], Expected]:
    return [a, p.envelope(), p.payload], ("topic is",)


def _unknown_topic(a: str, p: Parts) -> tuple[list[bytes], Expected]:
    _set(p, stream=a).topic = a.encode()
    return p.frames(), (f"unknown stream {a!r}",)


def _seq_zero(a: None, p: Parts) -> tuple[list[bytes], Expected]:
    return _set(p, seq=0).frames(), ("message without a sequence number",)


# A well-formed envelope is only a hint. If the payload is checked on the wire the
# reason names the payload; otherwise the hint is rejected as not in the journal.
def _invalid_utf8(a: bytes, p: Parts) -> tuple[list[bytes], Expected]:
    p.payload = a
    return p.frames(), ("payload is not valid UTF-8", p.not_journaled)


def _non_object_payload(a: Any, p: Parts) -> tuple[list[bytes], Expected]:
    p.payload = json.dumps(a).encode()
    return p.frames(), ("payload must be a JSON object", p.not_journaled)


def _forged_hint(a: None, p: Parts) -> tuple[list[bytes], Expected]:
    return p.frames(), (p.not_journaled,)


def _oversized_payload(a: int, p: Parts) -> tuple[list[bytes], Expected]:
    p.payload = b"{" + b" " * (a - 2) + b"}"  # a valid JSON object, just too big
    return p.frames(), (f"payload is {a} bytes, over the {MAX_PAYLOAD}-byte limit",)


def _oversized_envelope(a: int, p: Parts) -> tuple[list[bytes], Expected]:
    return _set(p, src="s" * a).frames(), (f"over the {MAX_ENVELOPE_BYTES}-byte limit",)


_BUILDERS: dict[str, Callable[[Any, Parts], tuple[list[bytes], Expected]]] = {
    "single_frame": lambda a, p: ([a], ("expected 3 frames [topic, envelope, payload], got 1",)),
    "frame_count": _frames_wrong_count,
    "truncated_envelope": _truncated,
    "garbage_envelope": _garbage_envelope,
    "non_object_envelope": _non_object_envelope,
    "wrong_type": _wrong_type,
    "missing_field": _missing,
    "negative_seq": _negative_seq,
    "bad_version": _bad_version,
    "bad_id_length": _bad_id,
    "stream_mismatch": _mismatch,
    "bad_topic": _bad_topic,
    "unknown_topic": _unknown_topic,
    "seq_zero": _seq_zero,
    "invalid_utf8_payload": _invalid_utf8,
    "non_object_payload": _non_object_payload,
    "forged_hint": _forged_hint,
    "oversized_payload": _oversized_payload,
    "oversized_envelope": _oversized_envelope,
}

_ids = itertools.count(1)
_seqs = itertools.count(1_000_000)  # far beyond anything journaled: every hint is a forgery


@dataclass(frozen=True)
class Case:
    """One malformed frame set; built at send time so that ids and seqs are always fresh."""

    kind: str
    arg: Any = None

    def build(self, stream: str) -> tuple[list[bytes], Expected]:
        parts = Parts(stream, f"fuzz-{next(_ids)}", next(_seqs))
        return _BUILDERS[self.kind](self.arg, parts)


_INT_FIELDS = ("v", "seq", "ts_ms")
_STR_FIELDS = ("id", "stream", "src")
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


def _wrong_types() -> st.SearchStrategy[tuple[str, Any]]:
    def not_int(v: Any) -> bool:
        return not isinstance(v, int) or isinstance(v, bool)

    return st.one_of(
        st.tuples(st.sampled_from(_INT_FIELDS), _json_values.filter(not_int)),
        st.tuples(st.sampled_from(_STR_FIELDS),
                  _json_values.filter(lambda v: not isinstance(v, str))),
        # The cases the acceptance names explicitly.
        st.sampled_from([("seq", "7"), ("seq", True), ("seq", False), ("seq", 1.0),
                         ("id", ["list", "id"]), ("v", "1"), ("ts_ms", None)]),
    )


def _invalid_utf8s() -> st.SearchStrategy[bytes]:
    lead = st.sampled_from([b"\xff", b"\xfe", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xf8\x88"])
    return st.tuples(st.binary(max_size=16), lead, st.binary(max_size=16)).map(
        lambda parts: b'{"message":"' + parts[0] + parts[1] + parts[2] + b'"}'
    ).filter(_not_utf8)


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _bad_topics() -> st.SearchStrategy[bytes]:
    non_ascii = st.tuples(st.binary(max_size=8), st.integers(0x80, 0xFF), st.binary(max_size=8)) \
        .map(lambda t: t[0] + bytes([t[1]]) + t[2])
    unprintable = st.tuples(st.text("abc_", max_size=5), st.integers(0, 31)) \
        .map(lambda t: (t[0] + chr(t[1])).encode())
    return st.one_of(st.just(b""), non_ascii, unprintable)


def _unknown_topics() -> st.SearchStrategy[str]:
    return st.text("abcdefghijklmnopqrstuvwxyz_.-0123456789", min_size=1, max_size=40) \
        .filter(lambda t: t not in KNOWN_STREAMS)


def _cases() -> st.SearchStrategy[Case]:
    def case(kind: str, arg: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Case]:
        return st.builds(Case, st.just(kind), st.none() if arg is None else arg)

    return st.one_of(
        case("single_frame", st.binary(max_size=2048)),
        case("frame_count", st.one_of(st.lists(st.binary(max_size=64), min_size=2, max_size=2),
                                      st.lists(st.binary(max_size=64), min_size=4, max_size=7))),
        case("truncated_envelope", st.integers(0, 10_000)),
        case("garbage_envelope", st.binary(max_size=MAX_ENVELOPE_BYTES)),
        case("non_object_envelope", _json_values.filter(lambda v: not isinstance(v, dict))),
        case("wrong_type", _wrong_types()),
        case("missing_field", st.sampled_from(_INT_FIELDS + _STR_FIELDS)),
        case("negative_seq", st.integers(-(2**62), -1)),
        case("bad_version", st.integers(-(2**31), 2**31).filter(lambda v: v != 1)),
        case("bad_id_length", st.sampled_from([0, MAX_ID_LEN + 1, 300])),
        case("stream_mismatch", st.text(max_size=40)),
        case("bad_topic", _bad_topics()),
        case("unknown_topic", _unknown_topics()),
        case("seq_zero"),
        case("forged_hint"),
        case("invalid_utf8_payload", _invalid_utf8s()),
        case("non_object_payload", _json_values.filter(lambda v: not isinstance(v, dict))),
        # Occasional only: one branch among many, and either just over or 1.5 MiB.
        case("oversized_payload", st.sampled_from([MAX_PAYLOAD + 1, MAX_PAYLOAD * 3 // 2])),
        case("oversized_envelope", st.integers(MAX_ENVELOPE_BYTES, 4 * MAX_ENVELOPE_BYTES)),
    )


def _match(expected: list[Expected], letters: list[DeadLetter]) -> list[Expected]:
    """Pair each expected reason with a distinct dead letter (bipartite matching).

    Returns the expectations no dead letter could be paired with.
    """
    fits = [[j for j, dl in enumerate(letters) if not want or any(w in dl.reason for w in want)]
            for want in expected]
    owner: dict[int, int] = {}  # letter index -> expectation index

    def assign(i: int, seen: set[int]) -> bool:
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return [want for i, want in enumerate(expected) if not assign(i, set())]


def _send_and_check(fuzzed: FuzzedAgent, batch: list[Case]) -> None:
    """Send the batch; each frame set must give exactly one dead letter with a reason."""
    agent = fuzzed.agent
    assert agent.alive(), f"{agent.name} is not running:\n{agent.stderr[-4000:]}"
    before = agent.dead_letter_count()
    expected = []
    for case in batch:
        frames, reason = case.build(agent.stream)
        fuzzed.pub.send_multipart(frames)
        expected.append(reason)
    target = before + len(batch)
    _wait(lambda: agent.dead_letter_count() >= target,
          f"{len(batch)} new dead letters from {agent.name}", agent.proc)
    time.sleep(0.05)  # anything extra (e.g. one frame set recorded twice) shows up here
    letters = agent.dead_letters()
    assert len(letters) == target, (
        f"{agent.name}: {len(batch)} frame sets sent, {len(letters) - before} dead letters"
    )
    new = letters[before:]
    for letter in new:
        assert letter.consumer == agent.name
        assert letter.reason.strip(), f"dead letter {letter.id} has no reason"
    unmatched = _match(expected, new)
    assert not unmatched, (
        f"no dead letter with a reason containing one of {unmatched}; "
        f"reasons: {[letter.reason for letter in new]}"
    )
    assert agent.alive(), f"{agent.name} died:\n{agent.stderr[-4000:]}"


# One of every kind, including the 1.5 MiB payload, whatever hypothesis happens to draw.
CATALOG = [
    Case("single_frame", b"\x00\xff random bytes"),
    Case("single_frame", b""),
    Case("frame_count", [b"telemetry_stream", b"{}"]),
    Case("frame_count", [b"a", b"b", b"c", b"d", b"e"]),
    Case("truncated_envelope", 40),
    Case("truncated_envelope", 0),
    Case("garbage_envelope", b"\xc3\x28 not json"),
    Case("non_object_envelope", [1, 2, 3]),
    Case("wrong_type", ("seq", "7")),
    Case("wrong_type", ("seq", True)),
    Case("wrong_type", ("id", ["list", "id"])),
    Case("wrong_type", ("ts_ms", 1.5)),
    Case("wrong_type", ("src", ["\N{GRINNING FACE}" * 100])),  # and over the envelope limit
    Case("missing_field", "src"),
    Case("negative_seq", -1),
    Case("bad_version", 2),
    Case("bad_id_length", MAX_ID_LEN + 1),
    Case("stream_mismatch", "execution_queue!"),
    Case("bad_topic", b"t\xe9l\xe9m\xe9trie"),
    Case("bad_topic", b""),
    Case("unknown_topic", "no_such_stream"),
    Case("seq_zero"),
    Case("invalid_utf8_payload", b'{"message":"\xff\xfe"}'),
    Case("non_object_payload", ["not", "an", "object"]),
    Case("forged_hint"),
    Case("oversized_payload", MAX_PAYLOAD * 3 // 2),
    Case("oversized_payload", MAX_PAYLOAD + 1),
    Case("oversized_envelope", 2 * MAX_ENVELOPE_BYTES),
]


def test_every_kind_of_malformed_frame_set_is_dead_lettered(fuzzed: FuzzedAgent) -> None:
    assert {case.kind for case in CATALOG} == set(_BUILDERS)
    _send_and_check(fuzzed, CATALOG)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(_cases(), min_size=1, max_size=8))
def test_malformed_frames_are_dead_lettered_and_crash_nothing(
    fuzzed: FuzzedAgent, batch: list[Case]
) -> None:
    for case in batch:
        event(case.kind)
    _send_and_check(fuzzed, batch)


# -- rejected payloads in the journal ------------------------------------------------

@dataclass(frozen=True)
class PayloadCase:
    invalid: list[tuple[bytes, list[str]]]  # payload, substrings its reason must contain
    valid: dict[str, Any]


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


_SIGNAL = {"pattern": "critical_error", "confidence": 0.97, "severity": "critical",
           "message": "panic: runtime error: invalid memory address or nil pointer dereference"}
_TASK = {"pattern": "critical_error", "delegate": "AgencyCodeAgent",
         "description": "Check the pointer for nil before use in handler.go",
         "acceptance": "The request no longer panics", "message": _SIGNAL["message"]}

PAYLOAD_CASES = {
    "witness": PayloadCase(
        invalid=[
            (_j({"message": 42}), ["'message'", "must be a string", "got integer"]),
            (_j({"msg": "disk full"}), ["missing required field 'message'"]),
            (_j({"message": "  \n\t"}), ["'message'", "empty"]),
            (_j({"message": None}), ["'message'", "got null"]),
            (_j({"message": ["disk", "full"]}), ["'message'", "got array"]),
            (_j(["message", "disk full"]), ["must be a JSON object", "got list"]),
            (b'{"message": "disk', ["not valid JSON"]),
            (b'{"message": "\xff\xfe"}', ["not valid UTF-8"]),
        ],
        valid={"message": "panic: runtime error: invalid memory address or nil pointer dereference",
               "event_id": "ev-1", "run_id": "r1", "cycle": 3},
    ),
    "architect": PayloadCase(
        invalid=[
            (_j({"signal_id": "s"}), ["missing field 'event_id'"]),
            (_j({"event_id": 7, **_SIGNAL}), ["'event_id'", "must be str", "got int"]),
            (_j({"event_id": ["ev"]}), ["'event_id'", "got list"]),
            (_j({"event_id": True}), ["'event_id'", "got bool"]),
            (_j({"event_id": "e", "message": "m"}), ["missing field 'pattern'"]),
            (_j({**_SIGNAL, "event_id": "e", "pattern": "disk"}),
             ["no delegate for pattern 'disk'"]),
            (_j({**_SIGNAL, "event_id": " "}), ["'event_id'", "empty"]),
            (b"null", ["must be a JSON object", "got NoneType"]),
            (b"\x80\x81", ["not valid UTF-8"]),
        ],
        valid={"event_id": "ev-1", "run_id": "r1", **_SIGNAL},
    ),
    "executor": PayloadCase(
        invalid=[
            (_j({"event_id": "e", "delegate": "d"}), ["missing field 'task_id'"]),
            (_j({"task_id": "t", "delegate": "d"}), ["missing field 'event_id'"]),
            (_j({"task_id": "t", "event_id": "e"}), ["missing field 'delegate'"]),
            (_j({"task_id": 1, "event_id": "e", "delegate": "d"}),
             ["'task_id'", "must be str", "got int"]),
            (_j({"task_id": "t", "event_id": "e", "delegate": False}),
             ["'delegate'", "must be str", "got bool"]),
            (_j({**_TASK, "task_id": "t", "event_id": "e", "delegate": "TestGenerator"}),
             ["names delegate 'TestGenerator'", "goes to AgencyCodeAgent"]),
            (b"42", ["must be a JSON object", "got int"]),
            (b"", ["not valid JSON"]),
        ],
        valid={"task_id": "ev-1/t1", "event_id": "ev-1", "run_id": "r1", **_TASK},
    ),
}


def _outputs(agent: Agent) -> list[dict[str, Any]]:
    """What the agent produced: rows on its output stream, or outcome rows."""
    assert agent.journal is not None
    if agent.name == "witness":
        return [m.json() for m in agent.journal.read_after(IMPROVEMENT, 0, 1000)]
    if agent.name == "architect":
        return [m.json() for m in agent.journal.read_after(EXECUTION, 0, 1000)]
    rows = agent.journal.conn.execute(
        "SELECT task_id, event_id, run_id, delegate, status FROM outcomes").fetchall()
    keys = ("task_id", "event_id", "run_id", "delegate", "status")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _check_output(name: str, outputs: list[dict[str, Any]]) -> None:
    assert len(outputs) == 1, outputs
    out = outputs[0]
    if name == "witness":
        assert out["event_id"] == out["signal_id"] == "ev-1"
        assert out["message"].startswith("panic: runtime error")
        assert out["pattern"] == "critical_error" and 0.5 < out["confidence"] <= 1
        assert out["run_id"] == "r1" and out["cycle"] == 3
    elif name == "architect":
        assert out["task_id"] == "ev-1/t1" and out["event_id"] == "ev-1"
        assert out["run_id"] == "r1" and out["delegate"] == "AgencyCodeAgent"
    else:
        # "failed" only if every provider failed: the outcome is still recorded once.
        assert out["status"] in ("done", "failed")
        assert {k: out[k] for k in ("task_id", "event_id", "run_id", "delegate")} == {
            "task_id": "ev-1/t1", "event_id": "ev-1", "run_id": "r1",
            "delegate": "AgencyCodeAgent"}


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_rejected_payloads_are_dead_lettered_and_the_agent_carries_on(name: str) -> None:
    case = PAYLOAD_CASES[name]
    agent = Agent(name)
    try:
        _journal_and_check(agent, case)
    except BaseException:
        agent.kill()
        agent.cleanup()
        raise
    try:
        _assert_clean_exit(agent)
    finally:
        agent.cleanup()


def _journal_and_check(agent: Agent, case: PayloadCase) -> None:
    name = agent.name
    assert agent.journal is not None
    # Journaled only, no live hints: the agent finds them by its periodic journal
    # check, so each message is dead-lettered once, from the journal, with its id.
    payloads = [raw for raw, _ in case.invalid] + [encode_payload(case.valid)]
    published: list[Message] = []
    with agent.journal.transaction() as tx:
        for i, raw in enumerate(payloads):
            msg = tx.publish(agent.stream, raw, key=f"case-{i}")
            assert msg is not None
            published.append(msg)

    head = published[-1].seq
    journal = agent.journal
    # The valid message costs ARCHITECT and EXECUTOR a model call.
    _wait(lambda: journal.cursor(name, agent.stream) >= head,
          f"{name} to apply up to seq {head}", agent.proc, timeout_s=MODEL_WAIT_S)

    letters = agent.dead_letters()
    assert len(letters) == len(case.invalid), [dl.reason for dl in letters]
    by_id = {dl.msg_id: dl for dl in letters}
    for msg, (raw, wanted) in zip(published, case.invalid, strict=False):
        letter = by_id.get(msg.msg_id)
        assert letter is not None, f"payload {raw!r} was not dead-lettered"
        assert letter.stream == agent.stream and letter.consumer == name
        assert letter.raw == raw and letter.size == len(raw)
        for part in wanted:
            assert part in letter.reason, (raw, letter.reason, part)
    assert published[-1].msg_id not in by_id, "the valid message was dead-lettered"
    _check_output(name, _outputs(agent))
    assert agent.alive(), f"{name} died:\n{agent.stderr[-4000:]}"
