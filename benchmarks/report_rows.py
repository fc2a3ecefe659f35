"""The one shape in which every benchmark's JSON report gives its figures.

Each ``reports/bench_*.json`` keeps its own keys and adds ``"rows"``: a list of figures,
each a JSON object with exactly these keys:

    name       what was measured, e.g. "bus: journaled throughput"
    value      the figure (a number), or null when it could not be measured (a target
               it has is then missed)
    unit       its unit: "msgs/s", "ms", "MB", ...
    reference  what it is compared with, measured in the same run, or null:
               {"name": "raw pyzmq PUB/SUB", "value": 223362, "unit": "msgs/s"}
    ratio      value / reference value (or the ratio the target is on), or null
    target     the target as text (">= 0.5 x reference", "<= 50 ms"), or null
    met        whether the target was met, or null when there is none

``benchmarks/bench_all.py`` reads them into one table; ``format_table`` prints rows as
text, for the suite and for a benchmark's own summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FIELDS = ("name", "value", "unit", "reference", "ratio", "target", "met")
COLUMNS = ("figure", "value", "reference (same run)", "ratio", "target", "met")


def figure(name: str, value: float | None, unit: str, *,
           reference: tuple[str, float, str] | None = None, ratio: float | None = None,
           target: str | None = None, met: bool | None = None) -> dict[str, Any]:
    """One row; ``ratio`` defaults to value / reference value. A value that is not a
    finite number (NaN: nothing to measure) is written as null."""
    if value is not None and not math.isfinite(value):
        value = None
    ref = None
    if reference is not None:
        ref_name, ref_value, ref_unit = reference
        ref = {"name": ref_name, "value": ref_value, "unit": ref_unit}
        if ratio is None and ref_value and value is not None:
            ratio = value / ref_value
    if (target is None) != (met is None):
        raise ValueError(f"{name}: a target needs its verdict and a verdict its target")
    return {"name": name, "value": value, "unit": unit, "reference": ref,
            "ratio": None if ratio is None else round(ratio, 4), "target": target, "met": met}


def problem(row: Any) -> str | None:
    """Why ``row`` is not a figure of the shape above, or None."""
    if not isinstance(row, dict):
        return f"a row is {type(row).__name__}, not an object"
    if sorted(row) != sorted(FIELDS):
        return f"row keys {sorted(row)} are not {list(FIELDS)}"
    if not isinstance(row["name"], str) or not row["name"]:
        return "a row has no name"
    for key in ("value", "ratio"):
        value = row[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            return f"{row['name']}: {key} {value!r} is not a finite number"
    if row["value"] is None and row["met"] is True:
        return f"{row['name']}: a target met without a value"
    ref = row["reference"]
    if ref is not None and (not isinstance(ref, dict) or sorted(ref) != ["name", "unit", "value"]):
        return f"{row['name']}: reference {ref!r} is not {{name, value, unit}}"
    if row["met"] not in (True, False, None) or (row["target"] is None) != (row["met"] is None):
        return f"{row['name']}: target {row['target']!r} and met {row['met']!r} do not go together"
    return None


def write_report(path: Path, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``report`` with its ``rows`` as ``path`` (JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "rows": rows}, indent=2) + "\n")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def cells(row: dict[str, Any]) -> tuple[str, ...]:
    """The table's columns for one row, as text."""
    ref = row["reference"]
    value = row.get("error") or f"{_number(row['value'])} {row['unit']}".strip()
    return (row["name"], value,
            "-" if ref is None else f"{ref['name']}: {_number(ref['value'])} {ref['unit']}",
            "-" if row["ratio"] is None else f"{row['ratio']:.3f}",
            row["target"] or "-", {True: "yes", False: "NO", None: "-"}[row["met"]])


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text, for the terminal."""
    lines = [COLUMNS, *map(cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths,
                                                                         strict=True)).rstrip()
                     for line in lines)
