"""``trinity classify``: JSON Lines in, one result line out per input line, in order."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import jsonlines

from trinity.agents.witness.knowledge import Knowledge
from trinity.contract.event import json_type
from trinity.errors import InvalidPayload
from trinity.settings import Settings


def _event_id(event: dict[str, Any]) -> str:
    for key in ("event_id", "id"):
        value = event.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return f"classify/{value}"
    # No id: identical events are one observation, so re-running a file learns nothing twice.
    canonical = json.dumps(event, sort_keys=True, ensure_ascii=True)
    return "classify/sha1:" + hashlib.sha1(canonical.encode("ascii")).hexdigest()


def classify_event(knowledge: Knowledge, event: object, number: int,
                   learn: bool) -> dict[str, Any]:
    if not isinstance(event, dict):
        return {"error": f"line {number}: expected a JSON object, got {json_type(event)}"}
    raw_id = event.get("id", event.get("event_id"))
    shown_id = raw_id if isinstance(raw_id, str | int | float) or raw_id is None else str(raw_id)
    try:
        seen = knowledge.observe(event, event_id=_event_id(event), learn=learn)
    except InvalidPayload as exc:
        return {"id": shown_id, "error": f"line {number}: {exc.reason}"}
    result: dict[str, Any] = {"id": shown_id, "pattern": seen.pattern,
                              "confidence": round(seen.confidence, 4)}
    if seen.reason and seen.pattern is None:
        result["reason"] = seen.reason
    return result


def run(settings: Settings, lines: Iterable[str], *, learn: bool) -> Iterator[dict[str, Any]]:
    """One result per input line, in order: the decision, or what is wrong with the line."""
    knowledge = Knowledge.open(settings)
    reader = jsonlines.Reader(line.rstrip("\n") for line in lines)
    try:
        for number in itertools.count(1):
            try:
                event = reader.read(allow_none=True)
            except EOFError:
                return
            except jsonlines.InvalidLineError as exc:
                if not exc.line.strip():
                    yield {"error": f"line {number}: empty line"}
                else:
                    cause = exc.__cause__ or exc
                    yield {"error": f"line {number}: not valid JSON ({str(cause)[:200]})"}
                continue
            yield classify_event(knowledge, event, number, learn)
    finally:
        reader.close()
        knowledge.close()
