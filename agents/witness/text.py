"""The text WITNESS classifies an event by, and its normalised form for hashed features.

``event_text`` renders an event (its message plus the structured fields that exist in
the wild) into short natural-language lines, within the limits below, and says what it
ignored or cut; it raises ``InvalidPayload`` and nothing else. ``normalise`` masks the
trivia of that text (numbers, ids, paths, ...) for the hashed n-gram features
(``features``). The method as a whole is described in ``model``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trinity.contract.event import MAX_MESSAGE_CHARS, Event, EventError
from trinity.errors import InvalidPayload

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


# ASCII's control characters (its only category-C ones) but tab, newline and return
_ASCII_CONTROLS = {c: " " for c in (*range(0x20), 0x7F) if chr(c) not in "\n\t\r"}


def _clean(text: str) -> tuple[str, bool]:
    """Valid UTF-8 without control characters; says whether anything was replaced."""
    fixed = text.encode("utf-8", "replace").decode("utf-8")
    changed = fixed != text
    if fixed.isascii():  # the usual case, without a Python step per character
        out = fixed.translate(_ASCII_CONTROLS)
    else:
        out = "".join(
            ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" or ch == "\r" else " "
            for ch in fixed
        )
    return out.replace("\r\n", "\n").replace("\r", "\n"), changed or out != fixed


def _text(value: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    """A field's text on one line (control characters blanked), or None if empty."""
    if value is None:
        return None
    cleaned = " ".join(_clean(value[:limit])[0].split())
    return cleaned or None


def _texts(key: str, values: list[str] | None, notes: list[str]) -> list[str] | None:
    if values is None:
        return None
    items = [item for item in (_text(v) for v in values[:MAX_LIST_ITEMS]) if item]
    if len(values) > MAX_LIST_ITEMS:
        notes.append(f"field {key!r} truncated to {MAX_LIST_ITEMS} items")
    return items or None


def _render_fields(event: Event, notes: list[str]) -> list[str]:
    lines: list[str] = []
    severity = _text(event.severity)
    if severity:
        lines.append(f"severity: {severity.lower()}")
    error_type = _text(event.error_type)
    if error_type:
        lines.append(f"error type: {error_type}")
    file = _text(event.file)
    if file:
        lines.append(f"file: {file}" + (f" line {event.line}" if event.line is not None else ""))
    test_name, test_file = _text(event.test_name), _text(event.test_file)
    if test_name or test_file:
        where = f" in {test_file}" if test_file else ""
        lines.append(f"test: {test_name or ''}{where}".replace("test:  in", "test in"))
    rate = event.rate
    if rate is not None:
        lines.append(f"failure rate: {round(rate * 100)}%")
    files = _texts("files", event.files, notes)
    if files:
        lines.append(f"files ({len(files)}): " + ", ".join(files))
    labels = _texts("labels", event.labels, notes)
    if labels:
        lines.append("labels: " + ", ".join(labels))
    source = _text(event.source)
    if source:
        lines.append(f"source: {source}")
    if event.stack_trace is not None:
        cleaned = _clean(event.stack_trace[:MAX_STACK_CHARS])[0].strip()
        if cleaned:
            lines.append(f"stack trace: {cleaned}")
    return lines


def event_text(event: Mapping[str, Any]) -> EventText:
    """The text an event is classified by, with notes on what was ignored or cut.

    The event is read through the contract's model (``Event.lenient``): an optional field
    of the wrong type is left out with a note. Raises ``InvalidPayload`` when there is
    nothing to classify (no usable message) and never anything else: this sits on the bus
    boundary, where any other exception would be a crash loop on one poisoned message.
    """
    try:
        return _event_text(event)
    except InvalidPayload:
        raise
    except Exception as exc:  # noqa: BLE001 - boundary: every failure becomes a rejection
        raise InvalidPayload(f"unreadable event: {type(exc).__name__}") from None


def _event_text(raw: Mapping[str, Any]) -> EventText:
    try:
        event, ignored = Event.lenient(raw)
    except EventError as exc:
        raise InvalidPayload(exc.reason) from None
    notes = list(ignored)
    message = event.message
    if len(message) > MAX_MESSAGE_CHARS:
        notes.append(f"message truncated from {len(message)} to {MAX_MESSAGE_CHARS} chars")
        message = message[:MAX_MESSAGE_CHARS]
    message, replaced = _clean(message)
    if replaced:
        notes.append("invalid unicode or control characters replaced in message")
    lines = [message.strip(), *_render_fields(event, notes)]
    return EventText("\n".join(lines), tuple(notes))


# -- normalisation for hashed features ----------------------------------------

# Each mask with the strings one of which a text must hold for it to match (none: no
# such test), so a text without them is not scanned: ~1 us a pattern a text.
_MASKS: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = (
    (re.compile(r"https?://\S+|www\.\S+"), " url ", ("http", "www.")),
    (
        re.compile(
            r"\d{4}[-/]\d{2}[-/]\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?)?"
            r"(?:Z|\s?[+-]\d{2}:?\d{2}|\s?UTC)?"
        ),
        " timestamp ",
        (),
    ),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), " timestamp ", (":",)),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), " hex ", ("0x",)),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b"), " hex ",
     ()),
)
_QUOTED = re.compile(r"'[^'\n]{1,80}'|\"[^\"\n]{1,80}\"|`[^`\n]{1,80}`")
# A path: segments ending in a slash, then a last one, perhaps after a drive ("C:").
# Written as "(?:[A-Za-z]:)?(?:[\w.@~+-]*[/\\])+[\w.@+-]*", the search tried every start
# inside a word, each rescanning the word to its end (quadratic: 24 of normalise's
# ~60 us a text). A match starting inside a run of path characters always has one at the
# run's start, which is found first, except for a drive there ("xC:/a"): so a match
# starts where no path character precedes, or at a drive. The matches are the same
# (tests/agents/witness/test_text_masks.py holds it to the old pattern).
_PATH = re.compile(
    r"(?<![\w.@~+-])(?:[A-Za-z]:)?(?:[\w.@~+-]*[/\\])+[\w.@+-]*"
    r"|[A-Za-z]:(?:[\w.@~+-]*[/\\])+[\w.@+-]*")
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
    for pattern, repl, needles in _MASKS:
        if not needles or any(needle in text for needle in needles):
            text = pattern.sub(repl, text)
    if "'" in text or '"' in text or "`" in text:
        text = _QUOTED.sub(_mask_keep_test("quoted"), text)
    if "/" in text or "\\" in text:
        text = _PATH.sub(_mask_keep_test("path"), text)
    if "." in text:
        text = _FILENAME.sub(_mask_keep_test("filename"), text)
    if text != text.lower():  # _CAMEL needs an upper-case letter
        text = _CAMEL.sub(" ", text)
    text = text.replace("_", " ")
    text = _NUMBER.sub("0", text)
    return _WS.sub(" ", text).strip().lower()


def key_of(normalised: str) -> str:
    """A text's key: its normalised form hashed (the same event with other numbers, ids,
    paths or times has the same key)."""
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()[:32]
