"""``trinity witness correct``: a person's labels for events, one at a time or a JSON Lines
file of them, recorded in the pattern store (see ``PatternStore.correct``).

A file line is ``{"event_id": ..., "label": ...}``, with ``"message"`` (the event's
text) when the store never classified the event. A line that cannot be applied (not
JSON, not an object, a field missing or of the wrong type, an unknown label, no text
for the event) is reported with its line number and the reason, dead-lettered in the
journal (consumer ``witness-correct``, its raw line kept: ``trinity dead-letters``), and
the others are still applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import jsonlines

from trinity.agents.witness.store import PatternStore
from trinity.bus.journal import Journal
from trinity.stores.patterns import Correction


@dataclass(frozen=True)
class Outcome:
    """One correction asked for: what was recorded, or why not."""

    where: str  # "event X" or "line N"
    correction: Correction | None = None
    error: str | None = None
    raw: bytes = b""  # what was asked, as given (kept with a dead letter)

    def describe(self) -> str:
        if self.correction is None:
            return f"{self.where}: not applied: {self.error}"
        c = self.correction
        was = "never decided here" if c.was is None else f"was {c.was}"
        return f"{self.where}: {was}, now {c.label} (correction {c.id}, exemplar {c.exemplar_id})"


DEAD_LETTER_CONSUMER = "witness-correct"


def apply(store: PatternStore, event_id: str | None, label: str, message: str | None = None,
          *, where: str, source: str, raw: bytes | None = None) -> Outcome:
    if raw is None:
        raw = json.dumps({"event_id": event_id, "label": label, "message": message}).encode()
    try:
        return Outcome(where, store.correct(event_id, label, message, source=source), raw=raw)
    except ValueError as exc:
        return Outcome(where, error=str(exc), raw=raw)


def dead_letter(journal_path: Path, outcomes: Sequence[Outcome]) -> int:
    """Record each correction not applied, with its reason and raw input; returns how many."""
    rejected = [o for o in outcomes if o.error is not None]
    if rejected:
        journal = Journal(journal_path, source=DEAD_LETTER_CONSUMER)
        try:
            with journal.transaction() as tx:
                for o in rejected:
                    tx.dead_letter(DEAD_LETTER_CONSUMER, f"{o.where}: {o.error}", o.raw)
        finally:
            journal.close()
    return len(rejected)


def _request(obj: Any) -> tuple[str | None, str, str | None]:
    """(event id, label, message) of a file line; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, not {type(obj).__name__}")
    event_id, label, message = obj.get("event_id"), obj.get("label"), obj.get("message")
    if not isinstance(label, str):
        raise ValueError("'label' must be a string" if "label" in obj else "'label' is missing")
    if event_id is not None and not isinstance(event_id, str):
        raise ValueError("'event_id' must be a string")
    if message is not None and not isinstance(message, str):
        raise ValueError("'message' must be a string")
    if event_id is None and message is None:
        raise ValueError("give 'event_id' or 'message'")
    return event_id, label, message


def apply_file(store: PatternStore, source: IO[str], name: str) -> Iterator[Outcome]:
    """Each line of ``source`` (JSON Lines) applied in order; blank lines are skipped."""
    at, last = 0, ""  # the number and text of the line the reader took last

    def numbered() -> Iterator[str]:
        nonlocal at, last
        for at, last in enumerate(source, 1):  # noqa: B007 - read by the loop below
            yield last

    reader = jsonlines.Reader(numbered())
    while True:
        try:
            obj = reader.read(skip_empty=True)
        except EOFError:
            return
        except jsonlines.InvalidLineError as exc:
            yield Outcome(f"line {exc.lineno}", error=f"not JSON: {exc}", raw=_raw(exc.line))
            continue
        where, raw = f"line {at}", _raw(last)
        try:
            event_id, label, message = _request(obj)
        except ValueError as exc:
            yield Outcome(where, error=str(exc), raw=raw)
            continue
        yield apply(store, event_id, label, message, where=where, source=f"file:{name}",
                    raw=raw)


def _raw(line: str | bytes) -> bytes:
    if isinstance(line, bytes):
        return line.rstrip(b"\r\n")
    return line.rstrip("\r\n").encode("utf-8", "surrogateescape")
