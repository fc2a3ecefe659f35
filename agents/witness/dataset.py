"""The shipped labelled events: the dev set the model is trained on, and the holdout.

Each line of ``agents/data/*.jsonl`` is an event plus its ``label`` and ``origin`` (and
sometimes a ``kind``); these are split off, so the event is what a producer would send.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonlines

# agents/data: beside this package, not inside it
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load_devset() -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every shipped dev-set line; the event has no label fields."""
    return load_labelled("devset_*.jsonl")


def load_labelled(pattern: str) -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every line of the data files matching ``pattern``."""
    out: list[tuple[dict[str, Any], str, str]] = []
    for path in sorted(DATA_DIR.glob(pattern)):
        for row in _rows(path):
            label = row.pop("label")
            origin = row.pop("origin")
            row.pop("kind", None)
            out.append((row, label, origin))
    return out


def load_plan_events() -> tuple[tuple[dict[str, Any], str, float], ...]:
    """The test plan's own example events: (event, label, the confidence the plan expects
    at least), from ``plan_events.jsonl``."""
    return tuple((row["event"], row["label"], float(row["minimum"]))
                 for row in _rows(DATA_DIR / "plan_events.jsonl"))


def _rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a shipped JSON Lines file (blank lines skipped); a line that is
    not one names the file and line."""
    with jsonlines.open(path) as reader:
        try:
            return [row for row in reader.iter(type=dict, skip_empty=True)]
        except jsonlines.InvalidLineError as exc:
            raise ValueError(f"{path.name} line {exc.lineno}: {exc}") from None
