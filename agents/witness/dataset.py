"""The shipped labelled events: the dev set the model is trained on, and the holdout.

Each line of ``agents/data/*.jsonl`` is an event plus its ``label`` and ``origin`` (and
sometimes a ``kind``); these are split off, so the event is what a producer would send.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# agents/data: beside this package, not inside it
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load_devset() -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every shipped dev-set line; the event has no label fields."""
    return load_labelled("devset_*.jsonl")


def load_labelled(pattern: str) -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every line of the data files matching ``pattern``."""
    out: list[tuple[dict[str, Any], str, str]] = []
    for path in sorted(DATA_DIR.glob(pattern)):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                label = row.pop("label")
                origin = row.pop("origin")
                row.pop("kind", None)
                out.append((row, label, origin))
    return out
