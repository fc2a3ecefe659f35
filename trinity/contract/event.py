"""The event: what ``trinity emit`` journals, what WITNESS classifies, what ``trinity
classify`` reads. One msgspec ``Struct``, :class:`Event`, says which fields exist, their
types and their limits; the three entry points read events through it, in one of two
ways:

- :meth:`Event.strict` (``trinity emit``): every field WITNESS reads must have its type,
  and the fields the controller sets (``run_id``, ``cycle``) may not be sent from
  outside; the first problem rejects the event, with a reason a sender can act on.
- :meth:`Event.lenient` (WITNESS, ``trinity classify``): an event already on the bus is
  classified on what is usable in it: an optional field of the wrong type is left out,
  with a note saying so. Only an event without a usable message is refused.

Both raise :class:`EventError` with the reason. Any field the model does not name is
passed on as it is: a producer's own fields are the producer's business. Type names in
reasons are JSON's (``string``, ``integer``, ``array``): the sender wrote JSON.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import msgspec

# WITNESS classifies the first this-many characters of the message: they must hold text.
MAX_MESSAGE_CHARS = 4000
EVENT_ID_MAX_CHARS = 128
# Far beyond any real event (WITNESS reads top-level fields only) and far below the depth
# where a JSON parser hits Python's recursion limit in any consumer.
MAX_DEPTH = 64
# Set by the controller on the events it emits; an external event may not claim them.
RESERVED = ("run_id", "cycle")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")
_RATE_TEXT = 'a rate in [0, 1], a percentage up to 100 or a string like "40%"'


class EventError(ValueError):
    """An event that cannot be taken; ``reason`` says why, ``event_id`` is the event's own
    id when it had a valid one."""

    def __init__(self, reason: str, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id = event_id


def json_type(value: object) -> str:
    """The JSON name of a value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def shown(text: str, limit: int = 60) -> str:
    """A sender's string inside a reason: ASCII-escaped (never a lone surrogate), bounded."""
    escaped = ascii(text[:limit])
    return escaped + "..." if len(text) > limit else escaped


def has_text(message: str) -> bool:
    """What WITNESS reads of the message (control characters blanked) is not empty."""
    return any(not ch.isspace() and unicodedata.category(ch)[0] != "C"
               for ch in message[:MAX_MESSAGE_CHARS])


def failure_rate(value: object) -> float | None:
    """A failure rate as a fraction in [0, 1]: 0.4, 40 (percent) and "40%" all read 0.4;
    None when it is none of these."""
    rate: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE.match(value[:50])
        if match:
            rate = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if rate is not None and rate > 1.0:
        rate /= 100.0
    if rate is None or not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
        return None
    return rate


def _rate_or_none(value: object) -> bool:
    return value is None or failure_rate(value) is not None


# What a named field's value must be beyond its type, and the reason when it is not.
_VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "message": (has_text, "no printable text"),
    "failure_rate": (_rate_or_none, "not a rate"),
}


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One event. ``message`` is required; the other named fields are optional (null means
    absent) and typed; anything else is the producer's and passes through the bus as it
    is (the event here holds the named fields only)."""

    message: str
    event_id: str | None = None
    run_id: str | None = None
    cycle: int | None = None
    severity: str | None = None
    file: str | None = None
    line: int | None = None
    error_type: str | None = None
    test_name: str | None = None
    test_file: str | None = None
    source: str | None = None
    stack_trace: str | None = None
    files: list[str] | None = None
    labels: list[str] | None = None
    failure_rate: float | int | str | None = None

    # What each named field must be, in a reason (JSON's words) and in a note (Python's).
    EXPECTED: ClassVar[dict[str, tuple[str, str]]] = {
        "message": ("a string", "str"), "event_id": ("a string", "str"),
        "run_id": ("a string", "str"), "cycle": ("an integer", "int"),
        **{name: ("a string", "str") for name in (
            "severity", "file", "error_type", "test_name", "test_file", "source",
            "stack_trace")},
        "line": ("an integer", "int"),
        "files": ("an array of strings", "list of str"),
        "labels": ("an array of strings", "list of str"),
        "failure_rate": (_RATE_TEXT, "a rate in [0, 1] or a percentage"),
    }

    def __post_init__(self) -> None:
        for name, (ok, why) in _VALUE_CHECKS.items():
            if not ok(getattr(self, name)):
                raise ValueError(why)

    @property
    def rate(self) -> float | None:
        """The failure rate as a fraction in [0, 1], if the event gives one."""
        return failure_rate(self.failure_rate)

    # -- reading ------------------------------------------------------------------------

    @classmethod
    def strict(cls, obj: object) -> Event:
        """An event from outside (``trinity emit``): every named field of its type, the
        event id printable text of 1..EVENT_ID_MAX_CHARS characters, no reserved field.
        Raises EventError with the first problem, in the order a sender reads them."""
        if not isinstance(obj, Mapping):
            raise EventError(f"expected a JSON object, got {json_type(obj)}")
        own_id = _event_id(obj)
        event, bad = _read(obj)
        if "message" in bad:
            raise EventError(_reason(obj, "message"), own_id)
        for key in RESERVED:
            if key in obj:
                raise EventError(f"field {key!r} is reserved: the controller sets it for its"
                                 f" own events (rename it, e.g. 'ci_{key}')", own_id)
        for name in cls.EXPECTED:
            if name in bad:
                raise EventError(_reason(obj, name), own_id)
        if event is None:  # not reached: each field the event refused raised above
            raise EventError("the event does not match its contract", own_id)
        return event

    @classmethod
    def lenient(cls, obj: object) -> tuple[Event, tuple[str, ...]]:
        """An event already on the bus (WITNESS, ``trinity classify``): optional fields of
        the wrong type are left out, each with a note. Raises EventError only when there
        is nothing to classify."""
        if not isinstance(obj, Mapping):
            raise EventError(f"expected a JSON object, got {json_type(obj)}")
        event, bad = _read(obj)
        if event is not None:
            return event, ()
        if "message" in bad:
            raise EventError(_reason(obj, "message"))
        notes = tuple(f"field {name!r} ignored: expected {cls.EXPECTED[name][1]}, got "
                      f"{type(obj[name]).__name__}" for name in cls.EXPECTED if name in bad)
        return cls(**{k: obj[k] for k in _FIELDS if k in obj and k not in bad}), notes


# The named fields and their types, as msgspec reads them.
_FIELDS: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Event)}


def _read(obj: Mapping[str, Any]) -> tuple[Event | None, set[str]]:
    """The event, or None and the named fields that are not what the event takes (each
    checked alone, so every bad field is found, not only the first)."""
    try:
        return msgspec.convert(dict(obj), Event, strict=True), set()
    except msgspec.ValidationError:
        pass
    bad = set()
    for name, kind in _FIELDS.items():
        if name not in obj:
            if name == "message":
                bad.add(name)
            continue
        try:
            msgspec.convert(obj[name], kind, strict=True)
        except msgspec.ValidationError:
            bad.add(name)
            continue
        check = _VALUE_CHECKS.get(name)
        if check is not None and not check[0](obj[name]):
            bad.add(name)
    return None, bad


def _event_id(obj: Mapping[str, Any]) -> str | None:
    """The event's own id, None if it has none; EventError if it has a bad one."""
    value = obj.get("event_id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError(f"field 'event_id' must be a string, got {json_type(value)}")
    if not 0 < len(value) <= EVENT_ID_MAX_CHARS:
        raise EventError(f"field 'event_id' must be 1..{EVENT_ID_MAX_CHARS} characters,"
                         f" got {len(value)}")
    if not value.isprintable() or not value.strip():
        raise EventError("field 'event_id' must be printable text (no control characters,"
                         " not blank)")
    return value


def _reason(obj: Mapping[str, Any], name: str) -> str:
    """Why the named field ``name`` of ``obj`` is not what the model takes."""
    if name not in obj:
        return f"missing required field {name!r}"
    value = obj[name]
    if name == "message" and isinstance(value, str):
        return "field 'message' is empty (no printable text)"
    got = json_type(value)
    if name == "failure_rate":
        if isinstance(value, str):
            got += f" {shown(value, 30)}"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            got += f" {value:.6g}"
    elif isinstance(value, list):
        got = next((f"{json_type(item)} at index {i}" for i, item in enumerate(value)
                    if not isinstance(item, str)), got)
    return f"field {name!r} must be {Event.EXPECTED[name][0]}, got {got}"
