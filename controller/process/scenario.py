"""The test plan's five event categories, rotated one per event interval, with noise.

Each category has a shipped set of realistic variants (``data/scenario_events.jsonl``,
one of them the plan's own example); the category is the ground truth the controller
records beside the event (it is never sent to WITNESS). Events of category ``none`` are
noise: ordinary operational messages that are none of the five.

Selection is a pure function of ``(seed, cycle)``: seeded ``random.Random`` instances
with string seeds (hashed with SHA-512, not the salted ``hash()``), so the same seed and
cycle give the same event in any process and after restarts.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import itertools
import random
from pathlib import Path
from typing import Any

import jsonlines

from trinity.contract import (
    CONSTITUTION_VIOLATION,
    CRITICAL_ERROR,
    DUPLICATION,
    FEATURE_REQUEST,
    FLAKY_TEST,
    NONE,
    PATTERNS,
)

DATA_PACKAGE = "trinity.controller.data"
DATA_FILE = "scenario_events.jsonl"

# The fields each category's variants must carry, and their types (bool is never an int).
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    CRITICAL_ERROR: {"severity": str, "file": str, "line": int, "error_type": str},
    CONSTITUTION_VIOLATION: {"file": str, "line": int, "severity": str,
                             "violation_type": str, "keywords": list},
    FEATURE_REQUEST: {"source": str, "priority": str, "complexity": str},
    DUPLICATION: {"files": list, "duplication_ratio": (int, float)},
    FLAKY_TEST: {"test_file": str, "test_name": str, "failure_rate": (str, int, float)},
    NONE: {},
}


class ScenarioDataError(ValueError):
    """The scenario events file is malformed; the message names the line."""


def _check_record(record: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(record, dict):
        raise ScenarioDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    category, fields, origin = record.get("category"), record.get("fields"), record.get("origin")
    if category not in _REQUIRED:
        raise ScenarioDataError(f"{where}: unknown category {category!r}")
    if not isinstance(origin, str) or not origin.strip():
        raise ScenarioDataError(f"{where}: 'origin' must be a non-empty string")
    if not isinstance(fields, dict):
        raise ScenarioDataError(f"{where}: 'fields' must be a JSON object")
    message = fields.get("message")
    if not isinstance(message, str) or not message.strip():
        raise ScenarioDataError(f"{where}: fields.message must be a non-empty string")
    for name, kind in _REQUIRED[category].items():
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ScenarioDataError(f"{where}: {category} needs fields.{name} of type "
                                    f"{getattr(kind, '__name__', kind)}, got {value!r}")
    return category, record


def parse_variants(text: str, source: str = DATA_FILE) -> dict[str, list[dict[str, Any]]]:
    """Variants by category (the five and ``none``), each ``{"category", "fields",
    "origin"}``; raises ``ScenarioDataError`` naming the first bad line."""
    variants: dict[str, list[dict[str, Any]]] = {name: [] for name in _REQUIRED}
    reader = jsonlines.Reader(text.splitlines())
    for number in itertools.count(1):
        where = f"{source} line {number}"
        try:
            record = reader.read(allow_none=True)
        except EOFError:
            break
        except jsonlines.InvalidLineError as exc:
            if not exc.line.strip():
                raise ScenarioDataError(f"{where}: empty line") from None
            raise ScenarioDataError(f"{where}: not valid JSON ({exc.__cause__ or exc})"
                                    ) from None
        category, record = _check_record(record, where)
        variants[category].append(record)
    empty = [name for name, records in variants.items() if not records]
    if empty:
        raise ScenarioDataError(f"{source}: no variants for {', '.join(empty)}")
    return variants


@functools.cache
def _shipped() -> dict[str, list[dict[str, Any]]]:
    text = importlib.resources.files(DATA_PACKAGE).joinpath(DATA_FILE).read_text("utf-8")
    return parse_variants(text)


def load_variants() -> dict[str, list[dict[str, Any]]]:
    """The shipped variants by category (read once; each call returns a fresh copy)."""
    return copy.deepcopy(_shipped())


def _check_cycle(cycle: int) -> None:
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1:
        raise ValueError(f"cycle must be an int >= 1, got {cycle!r}")


def read_scenario(path: Path) -> dict[str, list[dict[str, Any]]]:
    """A user's scenario file (TRINITY_SCENARIO), in the shipped file's format."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioDataError(f"cannot read scenario file {path}: {exc}") from None
    return parse_variants(text, str(path))


def event_for_cycle(cycle: int, seed: int = 0,
                    variants: dict[str, list[dict[str, Any]]] | None = None,
                    ) -> tuple[str, dict[str, Any]]:
    """The ground-truth category and the event fields for a 1-based cycle.

    The category rotates through ``PATTERNS``; the variant is the category's
    occurrence number indexed into a seeded permutation of its pool (a fresh permutation
    each time the pool is used up), so no variant repeats before all have been used.
    """
    _check_cycle(cycle)
    category = PATTERNS[(cycle - 1) % len(PATTERNS)]
    occurrence = (cycle - 1) // len(PATTERNS)
    pool = (variants or _shipped())[category]
    round_, position = divmod(occurrence, len(pool))
    order = list(range(len(pool)))
    random.Random(f"{seed}:{category}:{round_}").shuffle(order)
    return category, copy.deepcopy(pool[order[position]]["fields"])


def noise_for_cycle(cycle: int, seed: int, count: int,
                    variants: dict[str, list[dict[str, Any]]] | None = None,
                    ) -> list[dict[str, Any]]:
    """``count`` noise events (fields only) for a cycle: distinct while the pool lasts."""
    _check_cycle(cycle)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if count == 0:
        return []
    pool = (variants or _shipped())[NONE]
    rng = random.Random(f"{seed}:{NONE}:{cycle}")
    picks = rng.sample(range(len(pool)), min(count, len(pool)))
    picks += rng.choices(range(len(pool)), k=count - len(picks))
    return [copy.deepcopy(pool[i]["fields"]) for i in picks]
