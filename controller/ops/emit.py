"""``trinity emit``: external events (JSON Lines from CI, monitoring, ...) onto telemetry_stream.

Each input line is one event: a JSON object with a non-empty string ``message``; the
optional fields WITNESS reads are type-checked, any other field is passed on as is.
An accepted event is journaled on ``telemetry_stream`` (source ``emit``); a running
WITNESS applies it at its next journal check (``BusNode.drain`` looks at the journal
head every ``poll_interval_s``), so nothing is sent on the wire. A rejected line is
dead-lettered (consumer ``emit``) with its reason and raw bytes: never dropped.

Decisions:

* **Blank lines** (JSON whitespace only) are skipped without a result: JSON Lines
  files often end with one, and a harmless file must not exit non-zero. Line numbers
  still count them, so a result's ``line`` is the physical line in the input. A UTF-8
  byte order mark at the start of the first line is ignored (Windows tools write one).
* **event_id** is the idempotency key. Given, it must be a printable string of 1..128
  characters; absent (or null), ``ext/<uuid4 hex>`` is generated. An id already seen
  is reported as status ``duplicate`` (not accepted, not rejected: re-running a file
  after a partial failure is the point of the key) and is neither journaled again nor
  dead-lettered. "Seen" means: earlier in this input, in the ``emitted_events`` ledger
  (written in the same transaction as the publish, so it outlives the controller's
  pruning of applied messages), still in the journal under the same key, or in the
  controller's own ``events`` table.
* **run_id and cycle are rejected**, not stripped: the controller sets them and the
  records join on them (a run's budget, outcome counts), so an external event must
  not claim a run; stripping would silently drop data the sender meant to send (a
  CI's own ``run_id``, say). The reason says to rename the field.
* **An external event belongs to the run that is active when it arrives**: emit sets
  that run's ``run_id`` on the event (in the transaction that journals it) and records
  it beside the event id in ``emitted_events``, so its detection, plan, tasks, model
  calls and outcomes are the run's, and every view of the run (status, report,
  dashboards, ``trinity export``) shows it, marked external. It has no ground truth, so
  it never counts toward the plan's detection accuracy. With no active run it carries
  no run id.
* **Strict JSON**: ``NaN``/``Infinity`` (which Python's json accepts), numbers that
  overflow a double (``1e999`` would be journaled as ``Infinity``), duplicate keys,
  unpaired ``\\ud800``-style surrogate escapes (not encodable as UTF-8) and nesting
  deeper than :data:`MAX_DEPTH` are rejected, so every journaled payload is one any
  consumer decodes the same way.
* **Null means absent** for the optional fields, as in WITNESS. Type names in reasons
  are JSON's (``string``, ``integer``, ``array``, ...): the sender wrote JSON.
* Lines are journaled in batches of ``batch_size`` (one transaction each); a result
  is yielded only after its batch committed. Validation never touches the database,
  so a bad line cannot fail a good one; a journal failure (disk full, locked past the
  busy timeout) raises :class:`~trinity.errors.JournalError` with every line already
  yielded committed and none after it.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from trinity.bus.journal import Journal, message_id
from trinity.bus.message import encode_payload
from trinity.contract import TELEMETRY, TOPOLOGY
from trinity.contract.event import MAX_DEPTH, Event, EventError, json_type, shown
from trinity.settings import Settings
from trinity.stores import runs

SOURCE = "emit"
DEFAULT_BATCH_SIZE = 100
DUPLICATE = "duplicate event_id, already journaled"

_BOM = b"\xef\xbb\xbf"
_JSON_WS = b" \t\r\n"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

Status = Literal["accepted", "duplicate", "rejected"]


@dataclass(frozen=True, slots=True)
class EmitResult:
    """What became of one non-blank input line (``line`` is 1-based, blank lines counted)."""

    line: int
    status: Status
    event_id: str | None  # rejected lines: the line's own valid event_id, if it had one
    reason: str | None    # None when accepted

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "status": self.status, "event_id": self.event_id,
                "reason": self.reason}

    def describe(self) -> str:
        text = f"line {self.line}: {self.status}"
        if self.event_id is not None:
            text += f" {self.event_id}"
        return f"{text}: {self.reason}" if self.reason else text


@dataclass
class EmitSummary:
    """Counts for the end of ``trinity emit``; add each result as it comes."""

    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0

    def add(self, result: EmitResult) -> None:
        setattr(self, result.status, getattr(self, result.status) + 1)

    @property
    def total(self) -> int:
        return self.accepted + self.duplicate + self.rejected

    @property
    def exit_code(self) -> int:
        """1 if any line was rejected; duplicates are a successful (idempotent) re-run."""
        return 1 if self.rejected else 0

    def describe(self) -> str:
        text = (f"{self.total} events: {self.accepted} accepted, {self.duplicate} duplicate,"
                f" {self.rejected} rejected")
        if self.rejected:
            text += " (reasons and raw lines: trinity dead-letters)"
        return text


def summarize(results: Iterable[EmitResult]) -> EmitSummary:
    summary = EmitSummary()
    for result in results:
        summary.add(result)
    return summary


# -- validation (pure: never touches the database) ---------------------------------


class _Reject(Exception):
    """A line's reason for rejection."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id: str | None = None  # the line's own valid event_id, once known


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    raw: bytes
    event_id: str | None
    payload: bytes | None  # None: rejected, with reason
    reason: str | None


def _no_constants(name: str) -> Any:
    raise _Reject(f"{name} is not valid JSON (use null or a string)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {shown(text, 30)} is out of range for a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject(f"duplicate key {shown(key)} in a JSON object")
            seen.add(key)
    return obj


def _parse(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise _Reject(f"not valid JSON: {exc.msg} at column {exc.pos + 1}") from None
    except RecursionError:
        raise _Reject(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # an integer over Python's 4300-digit conversion limit
        raise _Reject(f"not valid JSON: {str(exc)[:120]}") from None


def _depth_ok(value: Any) -> bool:
    """True if ``value`` nests at most MAX_DEPTH containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return True


def _encode(event: dict[str, Any], limit: int, own_id: str | None) -> bytes:
    try:
        return _encode_checked(event, limit)
    except _Reject as exc:
        exc.event_id = own_id
        raise


def _check_unicode(event: dict[str, Any]) -> None:
    """Reject strings with an unpaired surrogate (from a \\ud800-style escape): no UTF-8."""
    try:
        encode_payload(event)
        return
    except UnicodeEncodeError:
        pass
    where = "a string"
    for key, value in event.items():
        try:
            encode_payload({key: value})
        except UnicodeEncodeError:
            where = f"field {shown(key)}"
            break
    raise _Reject(f"{where} contains an unpaired surrogate escape (\\ud800..\\udfff):"
                  " not valid Unicode")


def _encode_checked(event: dict[str, Any], limit: int) -> bytes:
    payload = encode_payload(event)
    if len(payload) > limit:
        raise _Reject(f"event is {len(payload)} bytes once encoded with its event_id,"
                      f" over the {limit}-byte limit")
    return payload


def _validate(raw: bytes, limit: int) -> tuple[str, bytes]:
    """(the event_id, given or generated; the payload to journal); raises _Reject."""
    if len(raw) > limit:
        raise _Reject(f"line is {len(raw)} bytes, over the {limit}-byte limit"
                      " (TRINITY_MAX_PAYLOAD_BYTES)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(f"line is not valid UTF-8 (byte {exc.start})") from None
    event = _parse(text)
    if not isinstance(event, dict):
        raise _Reject(f"expected a JSON object, got {json_type(event)}")
    if not _depth_ok(event):
        raise _Reject(f"JSON nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(text):  # only then can a string hold a lone surrogate
        _check_unicode(event)
    try:
        own_id = Event.strict(event).event_id
    except EventError as exc:
        rejected = _Reject(exc.reason)
        rejected.event_id = exc.event_id
        raise rejected from None
    if own_id is not None:
        return own_id, _encode(event, limit, own_id)
    event_id = f"ext/{uuid.uuid4().hex}"
    return event_id, _encode({**event, "event_id": event_id}, limit, None)


def _check_line(raw: bytes, number: int, limit: int) -> _Line:
    """Validate one line (without its terminator); never raises."""
    try:
        event_id, payload = _validate(raw, limit)
    except _Reject as exc:
        return _Line(number, raw, exc.event_id, None, exc.reason)
    except Exception as exc:  # noqa: BLE001 - the boundary: one line never stops the rest
        return _Line(number, raw, None, None, f"unreadable line: {type(exc).__name__}")
    return _Line(number, raw, event_id, payload, None)


def _raw_bytes(line: str | bytes) -> bytes:
    """The line's bytes without its terminator; str lines may carry surrogateescape bytes."""
    if isinstance(line, str):
        try:
            raw = line.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: invalid UTF-8
            raw = line.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(line)
    return raw.rstrip(b"\r\n")


# -- journaling -----------------------------------------------------------------------


def _in_run(batch: list[_Line], run: runs.Run | None, limit: int) -> Iterator[_Line]:
    """The batch's lines, each valid event carrying the active run's id (a line the id
    takes over the size limit is rejected)."""
    for ln in batch:
        if run is None or ln.payload is None:
            yield ln
            continue
        try:
            payload = _encode_checked({**json.loads(ln.payload), "run_id": run.run_id}, limit)
        except _Reject as exc:
            yield _Line(ln.number, ln.raw, ln.event_id, None,
                        f"{exc.reason} (the run id {run.run_id} included)")
            continue
        yield _Line(ln.number, ln.raw, ln.event_id, payload, None)


def _commit(journal: Journal, batch: list[_Line], seen: dict[str, int],
            limit: int) -> list[EmitResult]:
    """Journal a batch in one transaction; ``seen`` (event_id -> line) is updated on commit."""
    candidates = [ln.event_id for ln in batch
                  if ln.payload is not None and ln.event_id is not None
                  and ln.event_id not in seen]
    results: list[EmitResult] = []
    new: dict[str, int] = {}
    with journal.transaction() as tx:
        known = runs.already_emitted(tx.conn, candidates)
        run = runs.active_run(tx.conn)
        to_publish: list[tuple[bytes, str]] = []
        for ln in _in_run(batch, run, limit):
            if ln.payload is None or ln.event_id is None or ln.reason is not None:
                reason = ln.reason or "rejected"
                tx.dead_letter(SOURCE, f"line {ln.number}: {reason}", ln.raw, stream=TELEMETRY)
                results.append(EmitResult(ln.number, "rejected", ln.event_id, reason))
            elif ln.event_id in seen or ln.event_id in new:
                first = seen.get(ln.event_id) or new[ln.event_id]
                results.append(EmitResult(ln.number, "duplicate", ln.event_id,
                                          f"{DUPLICATE} (line {first})"))
            elif ln.event_id in known:
                results.append(EmitResult(ln.number, "duplicate", ln.event_id, DUPLICATE))
            else:
                new[ln.event_id] = ln.number
                to_publish.append((ln.payload, ln.event_id))
                results.append(EmitResult(ln.number, "accepted", ln.event_id, None))
        fresh = {msg.msg_id for msg in tx.publish_many(TELEMETRY, to_publish)}
        stale = {event_id for _, event_id in to_publish
                 if message_id(TELEMETRY, event_id) not in fresh}
        runs.record_emitted(tx.conn, [(event_id, message_id(TELEMETRY, event_id))
                                      for _, event_id in to_publish if event_id not in stale],
                            run)
    if stale:  # still in the journal under the same key: the controller's own event
        results = [EmitResult(r.line, "duplicate", r.event_id, DUPLICATE)
                   if r.accepted and r.event_id in stale else r for r in results]
    seen.update(new)
    return results


def emit_lines(
    settings: Settings, lines: Iterable[str | bytes], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[EmitResult]:
    """Validate and journal each line; one result per non-blank line, in order.

    ``lines`` may be bytes (a file opened in binary) or str (text, possibly decoded with
    ``errors="surrogateescape"``); line terminators are ignored. Results come once their
    batch is committed: use ``batch_size=1`` to publish each line as it arrives from a
    live stream. Raises :class:`~trinity.errors.JournalError` if the journal cannot be
    written; every result yielded before that is committed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    journal = Journal(settings.messages_db, source=SOURCE)
    try:
        # Declared consumers hold back pruning: a WITNESS that starts later still finds
        # every event. Idempotent, as every BusNode does the same at start.
        journal.declare(TELEMETRY, TOPOLOGY.consumers[TELEMETRY])
        runs.ensure_schema(journal.conn)
        limit = settings.max_payload_bytes
        seen: dict[str, int] = {}
        batch: list[_Line] = []
        for number, line in enumerate(lines, start=1):
            raw = _raw_bytes(line)
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip(_JSON_WS):
                continue
            batch.append(_check_line(raw, number, limit))
            if len(batch) >= batch_size:
                yield from _commit(journal, batch, seen, limit)
                batch = []
        if batch:
            yield from _commit(journal, batch, seen, limit)
    finally:
        journal.close()
