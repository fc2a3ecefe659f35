"""``trinity classify``: JSON Lines in, one result line out per input line, in order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from trinity.agents.witness.knowledge import Knowledge
from trinity.errors import InvalidPayload
from trinity.settings import Settings


def _event_id(event: dict[str, Any], line: str) -> str:
    for key in ("event_id", "id"):
        value = event.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return f"classify/{value}"
    # No id: identical events are one observation, so re-running a file learns nothing twice.
    return "classify/sha1:" + hashlib.sha1(line.encode("utf-8", "surrogateescape")).hexdigest()


def classify_line(knowledge: Knowledge, line: str, number: int, learn: bool) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return {"error": f"line {number}: not valid JSON ({str(exc)[:200]})"}
    if not isinstance(event, dict):
        return {"error": f"line {number}: expected a JSON object, got {type(event).__name__}"}
    raw_id = event.get("id", event.get("event_id"))
    shown_id = raw_id if isinstance(raw_id, str | int | float) or raw_id is None else str(raw_id)
    try:
        seen = knowledge.observe(event, event_id=_event_id(event, line), learn=learn)
    except InvalidPayload as exc:
        return {"id": shown_id, "error": f"line {number}: {exc.reason}"}
    result: dict[str, Any] = {"id": shown_id, "pattern": seen.pattern,
                              "confidence": round(seen.confidence, 4)}
    if seen.reason and seen.pattern is None:
        result["reason"] = seen.reason
    return result


def run(settings: Settings, lines: Iterable[str], *, learn: bool) -> Iterator[dict[str, Any]]:
    knowledge = Knowledge.open(settings)
    try:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                yield {"error": f"line {number}: empty line"}
                continue
            yield classify_line(knowledge, line, number, learn)
    finally:
        knowledge.close()
