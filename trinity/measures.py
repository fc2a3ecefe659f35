"""Figures computed from the recorded data, the same wherever they are shown.

The controller's pattern snapshots and anomaly rules, the dashboards, the criteria and
the report all score WITNESS's decisions against the ground truth the controller
recorded with each event (:func:`detection_scores`), measure learning as the trend of
the detected patterns' confidence (:func:`confidence_trend`), and read the pattern
statistics of a run (:func:`pattern_stats`) through here, so one figure is one
computation.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from trinity.contract import NONE, PATTERNS
from trinity.stores import patterns as pattern_store
from trinity.stores import runs


def run_truth(journal: sqlite3.Connection, run_id: str) -> dict[str, tuple[str, float]]:
    """event_id -> (ground-truth category, simulated time emitted) for one run."""
    return {e.event_id: (e.category, e.sim_elapsed_s) for e in runs.events(journal, run_id)}


def detection_scores(events: Mapping[str, tuple[str, float]],
                     decisions: Mapping[str, tuple[str | None, float]]) -> dict[str, Any]:
    """WITNESS's decisions (event_id -> (pattern or None, confidence)) scored against the
    ground truth the controller recorded with each event (:func:`run_truth`)."""
    processed = [(events[e][0], decisions[e][0]) for e in events if e in decisions]
    pattern_events = [(truth, got) for truth, got in processed if truth != NONE]
    noise = [(truth, got) for truth, got in processed if truth == NONE]
    detected = sum(got is not None for _, got in pattern_events)
    correct = sum((got or NONE) == truth for truth, got in processed)
    return {
        "events_emitted": len(events),
        "events_classified": len(processed),
        "pattern_events_classified": len(pattern_events),
        "detected": detected,
        "detection_rate": round(detected / len(pattern_events), 4) if pattern_events else None,
        "correct": correct,
        "accuracy": round(correct / len(processed), 4) if processed else None,
        "noise_events_classified": len(noise),
        "false_positives": sum(got is not None for _, got in noise),
    }


def half_trend(values: Sequence[float]) -> float | None:
    """Mean of the later half minus mean of the earlier half (None under two values)."""
    half = len(values) // 2
    if not half:
        return None
    return sum(values[half:]) / (len(values) - half) - sum(values[:half]) / half


def confidence_trend(patterns: sqlite3.Connection) -> float:
    """The trend of the detected patterns' confidence over the whole pattern store (it is
    shared across runs: this is its learning over time), rounded; 0.0 before two."""
    trend = half_trend(pattern_store.confidences(patterns))
    return 0.0 if trend is None else round(trend, 4)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least pct % of values <= it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def corrections_summary(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """People's corrections in the store: how many, and per label how many made it the
    answer (``to``) and took it away (``from``)."""
    return {"total": sum(c["to"] for c in counts.values()),
            "by_label": {label: dict(c) for label, c in counts.items()}}


def corrections_line(summary: Mapping[str, Any]) -> str:
    """The corrections in one line: "3 (none: 3 to it; duplication: 2 from it)"."""
    parts = []
    for label, c in summary["by_label"].items():
        said = [f"{c['to']} to it" if c["to"] else "", f"{c['from']} from it" if c["from"] else ""]
        parts.append(f"{label}: {', '.join(x for x in said if x)}")
    return f"{summary['total']:,}" + (f" ({'; '.join(parts)})" if parts else "")


def empty_pattern_stats(events: Mapping[str, tuple[str, float]]) -> dict[str, Any]:
    """The pattern snapshot's figures before WITNESS has written anything."""
    return {"detections": {"total": 0, "by_type": dict.fromkeys(PATTERNS, 0),
                           "average_confidence": None, "average_confidence_by_type": {}},
            "learning": {"total_patterns": 0, "new_patterns_this_hour": 0,
                         "confidence_trend": 0.0, "cross_session_matches": 0,
                         "corrections": corrections_summary({})},
            "scoring": detection_scores(events, {})}


def pattern_stats(journal: sqlite3.Connection, patterns: sqlite3.Connection, run_id: str,
                  sim_s: float, interval_s: float) -> dict[str, Any]:
    """The run's detections by pattern, what was learned in the interval ending at
    ``sim_s``, and the scores against the ground truth (the plan's pattern snapshot)."""
    events = run_truth(journal, run_id)
    decided = {e: (d.pattern, d.confidence)
               for e, d in pattern_store.run_decisions(patterns, run_id).items()}
    found = [(p, c) for p, c in decided.values() if p is not None]
    by_type = {name: sum(p == name for p, _ in found) for name in PATTERNS}
    conf_by_type = {name: round(sum(c for p, c in found if p == name) / by_type[name], 4)
                    for name in PATTERNS if by_type[name]}
    this_interval = [e for e, (_, t) in events.items() if sim_s - interval_s < t <= sim_s]
    return {
        "detections": {
            "total": len(found),
            "by_type": by_type,
            "average_confidence": round(sum(c for _, c in found) / len(found), 4)
            if found else None,
            "average_confidence_by_type": conf_by_type,
        },
        "learning": {
            "total_patterns": pattern_store.exemplar_count(patterns),
            "new_patterns_this_hour": pattern_store.learned_from(patterns, this_interval),
            "confidence_trend": confidence_trend(patterns),
            "cross_session_matches": pattern_store.cross_session_matches(patterns),
            "corrections": corrections_summary(pattern_store.correction_counts(patterns)),
        },
        "scoring": detection_scores(events, decided),
    }
