"""The text WITNESS classifies an event by, and its normalised form for hashed features.

``event_text`` renders an event (its message plus the structured fields that exist in
the wild) into short natural-language lines, within the limits below, and says what it
ignored or cut; it raises ``InvalidPayload`` and nothing else. ``normalise`` masks the
trivia of that text (numbers, ids, paths, ...) for the hashed n-gram features
(``features``). The method as a whole is described in ``model``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trinity.errors import InvalidPayload

MAX_MESSAGE_CHARS = 4000
MAX_FIELD_CHARS = 300
MAX_STACK_CHARS = 1000
MAX_LIST_ITEMS = 20
# Hashed features only look at the head of long texts: the decisive part of a log or a
# trace is near its start, and this bounds the per-call cost.
MAX_FEATURE_CHARS = 1500


# -- event text ---------------------------------------------------------------


@dataclass(frozen=True)
class EventText:
    text: str
    notes: tuple[str, ...]


def _clean(text: str) -> tuple[str, bool]:
    """Valid UTF-8 without control characters; says whether anything was replaced."""
    fixed = text.encode("utf-8", "replace").decode("utf-8")
    changed = fixed != text
    out = "".join(
        ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" or ch == "\r" else " "
        for ch in fixed
    )
    return out.replace("\r\n", "\n").replace("\r", "\n"), changed or out != fixed


def _type_name(value: object) -> str:
    return type(value).__name__


def _field_str(event: Mapping[str, Any], key: str, notes: list[str]) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        notes.append(f"field {key!r} ignored: expected str, got {_type_name(value)}")
        return None
    cleaned, _ = _clean(value[:MAX_FIELD_CHARS])
    cleaned = " ".join(cleaned.split())
    return cleaned or None


def _field_int(event: Mapping[str, Any], key: str, notes: list[str]) -> int | None:
    value = event.get(key)
    if value is None:
        return None
    # bool is an int subclass, but "line": true is not a line number
    if isinstance(value, bool) or not isinstance(value, int):
        notes.append(f"field {key!r} ignored: expected int, got {_type_name(value)}")
        return None
    return value


def _field_str_list(event: Mapping[str, Any], key: str, notes: list[str]) -> list[str] | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        notes.append(f"field {key!r} ignored: expected list of str, got {_type_name(value)}")
        return None
    items = [" ".join(_clean(v[:MAX_FIELD_CHARS])[0].split()) for v in value[:MAX_LIST_ITEMS]]
    items = [v for v in items if v]
    if len(value) > MAX_LIST_ITEMS:
        notes.append(f"field {key!r} truncated to {MAX_LIST_ITEMS} items")
    return items or None


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def _field_rate(event: Mapping[str, Any], notes: list[str]) -> float | None:
    """A failure rate as a fraction; accepts 0.4, 40 (percent) and "40%"."""
    value = event.get("failure_rate")
    if value is None:
        return None
    rate: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str):
        m = _RATE.match(value[:50])
        if m:
            rate = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if rate is not None and rate > 1.0:
        rate /= 100.0
    if rate is None or not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
        notes.append(
            f"field 'failure_rate' ignored: expected a rate in [0, 1] or a percentage, "
            f"got {_type_name(value)}"
        )
        return None
    return rate


def _render_fields(event: Mapping[str, Any], notes: list[str]) -> list[str]:
    lines: list[str] = []
    severity = _field_str(event, "severity", notes)
    if severity:
        lines.append(f"severity: {severity.lower()}")
    error_type = _field_str(event, "error_type", notes)
    if error_type:
        lines.append(f"error type: {error_type}")
    file = _field_str(event, "file", notes)
    line = _field_int(event, "line", notes)
    if file:
        lines.append(f"file: {file}" + (f" line {line}" if line is not None else ""))
    test_name = _field_str(event, "test_name", notes)
    test_file = _field_str(event, "test_file", notes)
    if test_name or test_file:
        where = f" in {test_file}" if test_file else ""
        lines.append(f"test: {test_name or ''}{where}".replace("test:  in", "test in"))
    rate = _field_rate(event, notes)
    if rate is not None:
        lines.append(f"failure rate: {round(rate * 100)}%")
    files = _field_str_list(event, "files", notes)
    if files:
        lines.append(f"files ({len(files)}): " + ", ".join(files))
    labels = _field_str_list(event, "labels", notes)
    if labels:
        lines.append("labels: " + ", ".join(labels))
    source = _field_str(event, "source", notes)
    if source:
        lines.append(f"source: {source}")
    trace = event.get("stack_trace")
    if trace is not None:
        if isinstance(trace, str):
            cleaned = _clean(trace[:MAX_STACK_CHARS])[0].strip()
            if cleaned:
                lines.append(f"stack trace: {cleaned}")
        else:
            notes.append(f"field 'stack_trace' ignored: expected str, got {_type_name(trace)}")
    return lines


def event_text(event: Mapping[str, Any]) -> EventText:
    """The text an event is classified by, with notes on what was ignored or cut.

    Raises ``InvalidPayload`` when there is nothing to classify (no usable message) and
    never anything else: this sits on the bus boundary, where any other exception would be
    a crash loop on one poisoned message.
    """
    try:
        return _event_text(event)
    except InvalidPayload:
        raise
    except Exception as exc:  # noqa: BLE001 - boundary: every failure becomes a rejection
        raise InvalidPayload(f"unreadable event: {_type_name(exc)}") from None


def _event_text(event: Mapping[str, Any]) -> EventText:
    if not isinstance(event, Mapping):
        raise InvalidPayload(f"event must be a JSON object, got {_type_name(event)}")
    if "message" not in event:
        raise InvalidPayload("missing field 'message'")
    message = event["message"]
    if not isinstance(message, str):
        raise InvalidPayload(f"field 'message' must be str, got {_type_name(message)}")
    notes: list[str] = []
    if len(message) > MAX_MESSAGE_CHARS:
        notes.append(f"message truncated from {len(message)} to {MAX_MESSAGE_CHARS} chars")
        message = message[:MAX_MESSAGE_CHARS]
    message, replaced = _clean(message)
    if replaced:
        notes.append("invalid unicode or control characters replaced in message")
    message = message.strip()
    if not message:
        raise InvalidPayload("field 'message' is empty")
    lines = [message, *_render_fields(event, notes)]
    return EventText("\n".join(lines), tuple(notes))


# -- normalisation for hashed features ----------------------------------------

_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"https?://\S+|www\.\S+"), " url "),
    (
        re.compile(
            r"\d{4}[-/]\d{2}[-/]\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?)?"
            r"(?:Z|\s?[+-]\d{2}:?\d{2}|\s?UTC)?"
        ),
        " timestamp ",
    ),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), " timestamp "),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), " hex "),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b"), " hex "),
)
_QUOTED = re.compile(r"'[^'\n]{1,80}'|\"[^\"\n]{1,80}\"|`[^`\n]{1,80}`")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\w.@~+-]*[/\\])+[\w.@+-]*")
_FILENAME = re.compile(r"\b[\w-]+\.(?:[a-z]{1,4})\b(?=[\s:(,)]|$)")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WS = re.compile(r"\s+")


def _mask_keep_test(tag: str) -> Any:
    """A mask that keeps one bit of the masked text: whether it names a test."""

    def repl(m: re.Match[str]) -> str:
        return f" {tag} test " if "test" in m.group(0).lower() else f" {tag} "

    return repl


def normalise(text: str) -> str:
    """Lower-cased text with trivia masked and identifiers split (for hashed features)."""
    text = text[:MAX_FEATURE_CHARS]
    # line-start markers: "Added ..." opening a line (a done change) is not "add ..."
    # inside a sentence, and a log's line heads carry its format
    text = "xxbos " + text.replace("\n", " xxbos ")
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    text = _QUOTED.sub(_mask_keep_test("quoted"), text)
    text = _PATH.sub(_mask_keep_test("path"), text)
    text = _FILENAME.sub(_mask_keep_test("filename"), text)
    text = _CAMEL.sub(" ", text)
    text = text.replace("_", " ")
    text = _NUMBER.sub("0", text)
    return _WS.sub(" ", text).strip().lower()
