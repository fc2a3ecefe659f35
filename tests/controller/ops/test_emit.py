"""``trinity emit``'s logic: JSON Lines validated, journaled onto telemetry_stream or dead-lettered.

Every test runs on a real SQLite journal. That a real WITNESS process picks an emitted
event up from the journal alone is tests/system/test_emit.py.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.bus.journal import DEAD_LETTER_RAW_LIMIT, Journal, message_id
from trinity.contract import TELEMETRY
from trinity.controller.ops.emit import DUPLICATE, EmitResult, emit_lines, summarize
from trinity.errors import InvalidPayload
from trinity.settings import Settings

GENERATED_ID = re.compile(r"^ext/[0-9a-f]{32}$")


def _settings(data_dir: Path, run_dir: Path, **env: str) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(data_dir), "TRINITY_RUN_DIR": str(run_dir),
                              **env})


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="te", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cfg(tmp_path: Path, run_dir: Path) -> Settings:
    return _settings(tmp_path / "data", run_dir)


@pytest.fixture
def journal(cfg: Settings) -> Iterator[Journal]:
    emit_all(cfg, [])  # creates the journal and the ledger
    j = Journal(cfg.messages_db, source="test")
    yield j
    j.close()


def emit_all(cfg: Settings, lines: list[Any], **kw: Any) -> list[EmitResult]:
    return list(emit_lines(cfg, lines, **kw))


def line(**event: Any) -> bytes:
    return json.dumps(event).encode()


def journaled(j: Journal) -> list[dict[str, Any]]:
    return [m.json() for m in j.read_after(TELEMETRY, 0, 100_000)]


# -- accepted lines ------------------------------------------------------------------


def test_accepted_lines_are_journaled_once_with_their_fields(cfg: Settings,
                                                              journal: Journal) -> None:
    full = {"event_id": "ci/42", "message": "Fatal error: NoneType in payment processing",
            "severity": "critical", "file": "payments/stripe.py", "line": 142,
            "error_type": "AttributeError", "test_name": "test_pay", "test_file": "t.py",
            "files": ["a.py", "b.py"], "labels": ["prod"], "failure_rate": "40%",
            "source": "ci", "stack_trace": "Traceback ...", "extra": {"nested": [1, 2.5]},
            "severity_hint": None}
    minimal = {"message": "Test flaky"}
    results = emit_all(cfg, [line(**full), line(**minimal)])

    assert [(r.line, r.status, r.reason) for r in results] == [
        (1, "accepted", None), (2, "accepted", None)]
    assert results[0].event_id == "ci/42"
    assert results[1].event_id is not None and GENERATED_ID.match(results[1].event_id)
    assert all(r.accepted for r in results)

    messages = journal.read_after(TELEMETRY, 0, 100)
    assert [m.json() for m in messages] == [full, {**minimal, "event_id": results[1].event_id}]
    assert [m.msg_id for m in messages] == [message_id(TELEMETRY, r.event_id)
                                            for r in results if r.event_id]
    assert {m.source for m in messages} == {"emit"}
    assert journal.dead_letters() == []
    # WITNESS's declared cursor exists from the start: pruning cannot take the events first.
    assert journal.cursor("witness", TELEMETRY) == 0
    assert ("witness", TELEMETRY) in {(b.consumer, b.stream) for b in journal.backlogs()}


def test_str_lines_with_terminators_bom_and_blank_lines(cfg: Settings, journal: Journal) -> None:
    lines: list[Any] = [
        "\ufeff" + '{"message": "first, after a byte order mark"}\n',
        "\n",
        "  \t\r\n",
        '{"message": "caf\u00e9 \U0001f600", "event_id": "e\u00e9"}\r\n',
        b"",
        b'{"message": "bytes line"}\n',
    ]
    results = emit_all(cfg, lines)
    # Blank lines give no result, but line numbers stay physical.
    assert [(r.line, r.status) for r in results] == [(1, "accepted"), (4, "accepted"),
                                                     (6, "accepted")]
    assert [e["message"] for e in journaled(journal)] == [
        "first, after a byte order mark", "caf\u00e9 \U0001f600", "bytes line"]
    assert results[1].event_id == "e\u00e9"


# -- rejected lines ------------------------------------------------------------------

RATE = ("field 'failure_rate' must be a rate in [0, 1], a percentage up to 100 or a string like"
        " \"40%\", got ")
BAD_LINES: list[tuple[str, bytes | str, str]] = [
    ("binary", b"\x00\xff\xfe garbage \x80", "line is not valid UTF-8 (byte 1)"),
    ("surrogateescape", '{"message": "caf\udce9"}', "line is not valid UTF-8 (byte 16)"),
    ("not json", b"hello", "not valid JSON: Expecting value at column 1"),
    ("truncated", b'{"message": "x"', "not valid JSON: Expecting ',' delimiter"),
    ("array", b"[]", "expected a JSON object, got array"),
    ("string", b'"x"', "expected a JSON object, got string"),
    ("null", b"null", "expected a JSON object, got null"),
    ("number", b"5", "expected a JSON object, got integer"),
    ("no message", b'{"msg": "x"}', "missing required field 'message'"),
    ("message int", b'{"message": 5}', "field 'message' must be a string, got integer"),
    ("message null", b'{"message": null}', "field 'message' must be a string, got null"),
    ("message empty", b'{"message": ""}', "field 'message' is empty (no printable text)"),
    ("message blank", b'{"message": " \\t\\u0000\\u200b "}',
     "field 'message' is empty (no printable text)"),
    ("NaN", b'{"message": "x", "v": NaN}', "NaN is not valid JSON"),
    ("Infinity", b'{"message": "x", "v": -Infinity}', "-Infinity is not valid JSON"),
    ("overflow", b'{"message": "x", "v": 1e400}', "number '1e400' is out of range for a double"),
    ("huge int", b'{"message": "x", "v": ' + b"9" * 5000 + b"}",
     "not valid JSON: Exceeds the limit"),
    ("deep", b"[" * 100_000 + b"]" * 100_000, "JSON nested more than 64 levels deep"),
    ("deep object", b'{"message": "x", "a": ' + b'{"a": ' * 70 + b"1" + b"}" * 71,
     "JSON nested more than 64 levels deep"),
    ("duplicate key", b'{"message": "x", "message": "y"}', "duplicate key 'message'"),
    ("lone surrogate", b'{"message": "x \\ud800"}',
     "field 'message' contains an unpaired surrogate escape"),
    ("line str", b'{"message": "x", "line": "42"}', "field 'line' must be an integer, got string"),
    ("line float", b'{"message": "x", "line": 4.0}', "field 'line' must be an integer, got number"),
    ("line bool", b'{"message": "x", "line": true}',
     "field 'line' must be an integer, got boolean"),
    ("severity", b'{"message": "x", "severity": 3}',
     "field 'severity' must be a string, got integer"),
    ("file", b'{"message": "x", "file": ["a"]}', "field 'file' must be a string, got array"),
    ("error_type", b'{"message": "x", "error_type": {}}',
     "field 'error_type' must be a string, got object"),
    ("test_name", b'{"message": "x", "test_name": 1}', "field 'test_name' must be a string"),
    ("test_file", b'{"message": "x", "test_file": 1}', "field 'test_file' must be a string"),
    ("source", b'{"message": "x", "source": false}',
     "field 'source' must be a string, got boolean"),
    ("stack_trace", b'{"message": "x", "stack_trace": ["a"]}',
     "field 'stack_trace' must be a string, got array"),
    ("files", b'{"message": "x", "files": "a.py"}',
     "field 'files' must be an array of strings, got string"),
    ("files item", b'{"message": "x", "files": ["a.py", 3]}',
     "field 'files' must be an array of strings, got integer at index 1"),
    ("labels", b'{"message": "x", "labels": [null]}',
     "field 'labels' must be an array of strings, got null at index 0"),
    ("rate word", b'{"message": "x", "failure_rate": "often"}', RATE + "string 'often'"),
    ("rate range", b'{"message": "x", "failure_rate": 250}', RATE + "integer 250"),
    ("rate negative", b'{"message": "x", "failure_rate": "-5%"}', RATE + "string '-5%'"),
    ("rate bool", b'{"message": "x", "failure_rate": true}', RATE + "boolean"),
    ("run_id", b'{"message": "x", "run_id": "r1"}', "field 'run_id' is reserved"),
    ("cycle", b'{"message": "x", "cycle": null}', "field 'cycle' is reserved"),
    ("event_id int", b'{"message": "x", "event_id": 7}',
     "field 'event_id' must be a string, got integer"),
    ("event_id empty", b'{"message": "x", "event_id": ""}',
     "field 'event_id' must be 1..128 characters, got 0"),
    ("event_id long", line(message="x", event_id="e" * 129),
     "field 'event_id' must be 1..128 characters, got 129"),
    ("event_id control", b'{"message": "x", "event_id": "a\\nb"}',
     "field 'event_id' must be printable text"),
    ("event_id blank", b'{"message": "x", "event_id": "   "}',
     "field 'event_id' must be printable text"),
]


@pytest.mark.parametrize(("raw", "reason"), [(raw, reason) for _, raw, reason in BAD_LINES],
                         ids=[name for name, _, _ in BAD_LINES])
def test_each_bad_line_has_its_reason_and_a_dead_letter(cfg: Settings, journal: Journal,
                                                        raw: bytes | str, reason: str) -> None:
    (result,) = emit_all(cfg, [raw])
    assert result.status == "rejected" and not result.accepted
    assert result.reason is not None and result.reason.startswith(reason), result.reason
    assert journaled(journal) == []
    (letter,) = journal.dead_letters()
    raw_bytes = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    assert (letter.consumer, letter.stream, letter.reason) == ("emit", TELEMETRY,
                                                               f"line 1: {result.reason}")
    assert letter.size == len(raw_bytes)
    assert letter.raw == raw_bytes[:DEAD_LETTER_RAW_LIMIT]


def test_a_rejected_line_reports_its_own_valid_event_id(cfg: Settings, journal: Journal) -> None:
    results = emit_all(cfg, [line(message=5, event_id="ci/1"), line(message=5, event_id=3),
                             line(message="x", event_id="ci/2", run_id="r")])
    assert [(r.status, r.event_id) for r in results] == [
        ("rejected", "ci/1"), ("rejected", None), ("rejected", "ci/2")]
    # Rejected ids are not taken: the corrected line is accepted.
    (fixed,) = emit_all(cfg, [line(message="x", event_id="ci/1")])
    assert fixed.accepted


def test_oversized_lines_are_rejected_without_parsing(cfg: Settings, journal: Journal) -> None:
    ten_mb = b'{"message": "' + b"x" * (10 << 20) + b'"}'
    results = emit_all(cfg, [ten_mb, line(message="small")])
    assert [r.status for r in results] == ["rejected", "accepted"]
    assert results[0].reason == (f"line is {len(ten_mb)} bytes, over the 1048576-byte limit"
                                 " (TRINITY_MAX_PAYLOAD_BYTES)")
    (letter,) = journal.dead_letters()
    assert letter.size == len(ten_mb) and letter.raw == ten_mb[:DEAD_LETTER_RAW_LIMIT]


def test_the_limit_applies_to_the_payload_with_its_generated_event_id(
        tmp_path: Path, run_dir: Path) -> None:
    small = _settings(tmp_path, run_dir, TRINITY_MAX_PAYLOAD_BYTES="1024")
    at_limit = line(message="x" * (1024 - len(line(message=""))))
    assert len(at_limit) == 1024
    results = emit_all(small, [at_limit, line(message="x" * 980, event_id="given")])
    assert results[0].status == "rejected"
    assert results[0].reason is not None and re.fullmatch(
        r"event is \d+ bytes once encoded with its event_id, over the 1024-byte limit",
        results[0].reason)
    assert results[1].accepted


def test_witness_reads_the_same_message_chars(cfg: Settings) -> None:
    from trinity.agents.witness import text

    blank_head = json.dumps({"message": " " * text.MAX_MESSAGE_CHARS + "late text"})
    (result,) = emit_all(cfg, [blank_head])
    assert result.reason == "field 'message' is empty (no printable text)"
    with pytest.raises(InvalidPayload):
        text.event_text(json.loads(blank_head))


# -- duplicates ------------------------------------------------------------------------


def test_duplicate_event_ids_publish_once(cfg: Settings, journal: Journal) -> None:
    first = line(message="deploy failed", event_id="ci/7")
    again = line(message="deploy failed (retried upload)", event_id="ci/7")
    results = emit_all(cfg, [first, again, first])
    assert [(r.status, r.event_id, r.reason) for r in results] == [
        ("accepted", "ci/7", None),
        ("duplicate", "ci/7", f"{DUPLICATE} (line 1)"),
        ("duplicate", "ci/7", f"{DUPLICATE} (line 1)"),
    ]
    # A second run of the same file: nothing new, no dead letters (not a problem).
    rerun = emit_all(cfg, [first])
    assert [(r.status, r.reason) for r in rerun] == [("duplicate", DUPLICATE)]
    assert [e["message"] for e in journaled(journal)] == ["deploy failed"]
    assert journal.dead_letters() == []
    summary = summarize(results + rerun)
    assert (summary.accepted, summary.duplicate, summary.rejected, summary.exit_code) == (
        1, 3, 0, 0)


def test_duplicates_are_caught_after_the_journal_is_pruned(cfg: Settings,
                                                           journal: Journal) -> None:
    emit_all(cfg, [line(message="x", event_id="ci/8")])
    with journal.transaction() as tx:
        tx.advance_cursor("witness", TELEMETRY, journal.head(TELEMETRY))
    assert journal.prune() == 1
    (result,) = emit_all(cfg, [line(message="x", event_id="ci/8")])
    assert result.status == "duplicate"
    assert journaled(journal) == []


def test_the_controllers_events_are_duplicates(cfg: Settings, journal: Journal) -> None:
    from trinity.stores import runs as records

    records.ensure_schema(journal.conn)
    journal.conn.execute(
        "INSERT INTO events(event_id, run_id, cycle, category, emitted_ms, sim_elapsed_s)"
        " VALUES ('run1/c001', 'run1', 1, 'critical_error', 0, 0)")
    with journal.transaction() as tx:  # still in the journal, and not in the events table
        tx.publish(TELEMETRY, b'{"message":"m","event_id":"run1/c002"}', key="run1/c002")
    results = emit_all(cfg, [line(message="x", event_id="run1/c001"),
                             line(message="x", event_id="run1/c002"),
                             line(message="x", event_id="run1/c003")])
    assert [r.status for r in results] == ["duplicate", "duplicate", "accepted"]
    assert [e["event_id"] for e in journaled(journal)] == ["run1/c002", "run1/c003"]
    # Only what emit journaled is in its ledger.
    ledger = journal.conn.execute("SELECT event_id FROM emitted_events").fetchall()
    assert ledger == [("run1/c003",)]


# -- the active run ----------------------------------------------------------------------


def test_an_event_belongs_to_the_run_active_when_it_arrives(cfg: Settings,
                                                            journal: Journal) -> None:
    """Before any run, an emitted event carries no run id; during a run it carries the
    run's, and the ledger says which run and when (simulated) it arrived."""
    from trinity.stores import runs as records

    emit_all(cfg, [line(message="before any run", event_id="ci/0")])
    run = records.create_run(journal.conn, {"duration_hours": 2})
    records.checkpoint(journal.conn, run.run_id, 5400.0)
    emit_all(cfg, [line(message="Segfault in worker 3", event_id="ci/1"),
                   line(message="Service unavailable: upstream refused connection")])
    events = journaled(journal)
    assert "run_id" not in events[0]
    assert [e.get("run_id") for e in events[1:]] == [run.run_id, run.run_id]
    external = records.external_events(journal.conn, run.run_id)
    assert [e.event_id for e in external] == ["ci/1", events[2]["event_id"]]
    assert {e.sim_elapsed_s for e in external} == {5400.0}
    assert records.progress(journal.conn, run.run_id)["external"] == 2
    records.finish(journal.conn, run.run_id, records.COMPLETED)
    emit_all(cfg, [line(message="after the run", event_id="ci/2")])
    assert "run_id" not in journaled(journal)[-1]
    assert len(records.external_events(journal.conn, run.run_id)) == 2


def test_the_run_id_counts_toward_the_size_limit(tmp_path: Path, run_dir: Path) -> None:
    """A line that fits alone but not with the run's id is rejected with both reasons,
    and dead-lettered: never journaled over the limit."""
    from trinity.stores import runs as records

    small = _settings(tmp_path, run_dir, TRINITY_MAX_PAYLOAD_BYTES="1024")
    emit_all(small, [])
    j = Journal(small.messages_db, source="test")
    try:
        run = records.create_run(j.conn, {})
        event = line(message="x", event_id="ci/9")
        fits = line(message="x" * (1024 - len(event) + 1), event_id="ci/9")
        assert len(fits) == 1024
        (result,) = emit_all(small, [fits])
        assert result.status == "rejected"
        assert result.reason is not None and result.reason.endswith(
            f"over the 1024-byte limit (the run id {run.run_id} included)")
        assert journaled(j) == [] and len(j.dead_letters()) == 1
    finally:
        j.close()


# -- batches ---------------------------------------------------------------------------


def test_mixed_batches_keep_order_and_good_lines(cfg: Settings, journal: Journal) -> None:
    lines: list[bytes] = []
    expected: list[str] = []
    for i in range(25):
        kind = i % 5
        if kind == 0:
            lines.append(line(message=f"good {i}", event_id=f"b/{i}"))
            expected.append("accepted")
        elif kind == 1:
            lines.append(b"\xff not utf-8")
            expected.append("rejected")
        elif kind == 2:
            lines.append(line(message=f"good {i}"))
            expected.append("accepted")
        elif kind == 3:
            lines.append(line(message=f"again {i}", event_id=f"b/{i - 3}"))
            expected.append("duplicate")
        else:
            lines.append(b"")
    results = emit_all(cfg, lines, batch_size=3)
    assert [r.status for r in results] == expected
    assert [r.line for r in results] == [i + 1 for i in range(25) if i % 5 != 4]
    assert [e["message"] for e in journaled(journal)] == [
        f"good {i}" for i in range(25) if i % 5 in (0, 2)]
    assert [d.reason for d in journal.dead_letters()] == [
        f"line {i + 1}: line is not valid UTF-8 (byte 0)" for i in range(25) if i % 5 == 1]
    summary = summarize(results)
    assert (summary.accepted, summary.duplicate, summary.rejected, summary.total) == (10, 5, 5, 20)
    assert summary.exit_code == 1
    assert summary.describe() == ("20 events: 10 accepted, 5 duplicate, 5 rejected"
                                  " (reasons and raw lines: trinity dead-letters)")


def test_results_come_after_their_batch_is_committed(cfg: Settings, journal: Journal) -> None:
    lines = (line(message=f"m{i}", event_id=f"c/{i}") for i in range(5))
    results = emit_lines(cfg, lines, batch_size=2)
    first = next(results)
    assert first.event_id == "c/0" and journal.head(TELEMETRY) == 2
    assert [r.event_id for r in results] == ["c/1", "c/2", "c/3", "c/4"]
    assert journal.head(TELEMETRY) == 5


def test_batch_size_must_be_positive(cfg: Settings) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        emit_all(cfg, [], batch_size=0)


def test_result_and_summary_text() -> None:
    ok = EmitResult(3, "accepted", "ci/1", None)
    bad = EmitResult(4, "rejected", None, "expected a JSON object, got array")
    assert ok.describe() == "line 3: accepted ci/1"
    assert bad.describe() == "line 4: rejected: expected a JSON object, got array"
    assert ok.as_dict() == {"line": 3, "status": "accepted", "event_id": "ci/1", "reason": None}
    assert summarize([ok]).describe() == "1 events: 1 accepted, 0 duplicate, 0 rejected"
    assert summarize([ok]).exit_code == 0 and summarize([ok, bad]).exit_code == 1


# -- fuzz ------------------------------------------------------------------------------

_json_scalars = (st.none() | st.booleans() | st.integers() | st.text()
                 | st.floats(allow_nan=False, allow_infinity=False))
_json = st.recursive(_json_scalars, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)
_FIELDS = ("message", "event_id", "severity", "file", "line", "error_type", "test_name",
           "test_file", "files", "labels", "failure_rate", "source", "stack_trace", "run_id",
           "cycle", "extra")
_events = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6) | st.fixed_dictionaries(
    {"message": st.text(min_size=1)},
    optional={"event_id": st.sampled_from(["a", "b", "c"]) | st.text(max_size=3),
              "line": st.integers() | st.text(max_size=2),
              "files": st.lists(st.text(max_size=3) | st.integers(), max_size=3),
              "failure_rate": st.floats() | st.text(max_size=4) | st.integers(-5, 500)})
# Mostly valid events, with a few repeated ids: accepted and duplicate lines are common too.
_good = st.fixed_dictionaries(
    {"message": st.sampled_from(["boom", "Test flaky 40%"]) | st.text(min_size=1)},
    optional={"event_id": st.sampled_from(["a", "b", "c/1"]), "line": st.integers(),
              "severity": st.text(max_size=8), "labels": st.lists(st.text(max_size=3)),
              "failure_rate": st.floats(0, 1) | st.integers(0, 100)})
_lines = (
    _good.map(lambda e: json.dumps(e).encode())
    | st.binary(max_size=80)
    | _events.map(lambda e: json.dumps(e).encode())
    | _events.map(lambda e: json.dumps(e, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    | _json.map(lambda v: json.dumps(v).encode())
    | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_lines, max_size=12), batch_size=st.integers(1, 5))
def test_fuzz_every_line_gets_one_result_and_a_row_or_a_dead_letter(
        lines: list[bytes], batch_size: int) -> None:
    from trinity.agents.witness.text import event_text

    root = Path(tempfile.mkdtemp(prefix="tf", dir="/tmp"))
    try:
        cfg = _settings(root, root / "run")
        results = emit_all(cfg, lines, batch_size=batch_size)
        j = Journal(cfg.messages_db, source="test")
        try:
            messages = {m.msg_id: m.json() for m in j.read_after(TELEMETRY, 0, 1000)}
            letters = {int(d.reason.split(":")[0].removeprefix("line ")): d
                       for d in j.dead_letters()}
        finally:
            j.close()
        stripped = [ln.rstrip(b"\r\n") for ln in lines]
        stripped[:1] = [s.removeprefix(b"\xef\xbb\xbf") for s in stripped[:1]]
        non_blank = [i + 1 for i, s in enumerate(stripped) if s.strip(b" \t\r\n")]
        assert [r.line for r in results] == non_blank
        accepted_ids: set[str] = set()
        for r in results:
            raw = stripped[r.line - 1]
            if r.status == "accepted":
                assert r.event_id is not None and r.event_id not in accepted_ids
                accepted_ids.add(r.event_id)
                event = messages[message_id(TELEMETRY, r.event_id)]
                assert event == {**json.loads(raw), "event_id": r.event_id}
                assert r.line not in letters
                # What emit accepts, WITNESS reads without ignoring a known field.
                notes = event_text(event).notes
                assert not [n for n in notes if "ignored" in n], notes
            elif r.status == "duplicate":
                assert r.event_id in accepted_ids and r.line not in letters
            else:
                assert r.reason and letters[r.line].reason == f"line {r.line}: {r.reason}"
                assert letters[r.line].raw == raw[:DEAD_LETTER_RAW_LIMIT]
        assert len(messages) == len(accepted_ids)
        assert len(letters) == sum(r.status == "rejected" for r in results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
