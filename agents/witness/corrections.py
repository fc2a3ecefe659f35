"""``trinity witness correct``: a person's labels for events, one at a time or a JSON Lines
file of them, recorded in the pattern store (see ``PatternStore.correct``).

A file line is ``{"event_id": ..., "label": ...}``, with ``"message"`` (the event's
text) when the store never classified the event. A line that cannot be applied (not
JSON, not an object, a field missing or of the wrong type, an unknown label, no text
for the event) is reported with its line number and the reason, and the others are
still applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import jsonlines

from trinity.agents.witness.store import PatternStore
from trinity.stores.patterns import Correction


@dataclass(frozen=True)
class Outcome:
    """One correction asked for: what was recorded, or why not."""

    where: str  # "event X" or "line N"
    correction: Correction | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.correction is None:
            return f"{self.where}: not applied: {self.error}"
        c = self.correction
        was = "never decided here" if c.was is None else f"was {c.was}"
        return f"{self.where}: {was}, now {c.label} (correction {c.id}, exemplar {c.exemplar_id})"


def apply(store: PatternStore, event_id: str | None, label: str, message: str | None = None,
          *, where: str, source: str) -> Outcome:
    try:
        return Outcome(where, store.correct(event_id, label, message, source=source))
    except ValueError as exc:
        return Outcome(where, error=str(exc))


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
    at = 0  # the number of the line the reader took last

    def numbered() -> Iterator[str]:
        nonlocal at
        for at, line in enumerate(source, 1):  # noqa: B007 - read by the loop below
            yield line

    reader = jsonlines.Reader(numbered())
    while True:
        try:
            obj = reader.read(skip_empty=True)
        except EOFError:
            return
        except jsonlines.InvalidLineError as exc:
            yield Outcome(f"line {exc.lineno}", error=f"not JSON: {exc}")
            continue
        where = f"line {at}"
        try:
            event_id, label, message = _request(obj)
        except ValueError as exc:
            yield Outcome(where, error=str(exc))
            continue
        yield apply(store, event_id, label, message, where=where, source=f"file:{name}")
