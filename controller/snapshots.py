"""The plan's snapshot files, each computed from recorded data at the moment it is written.

``costs/cost_snapshot_HHMMSS.json`` (from the cost ledger) and
``patterns/pattern_stats_HHMMSS.json`` (from the pattern store and the run's events)
every snapshot interval, ``metrics/system_metrics_HHMMSS.json`` every metrics
interval; ``HHMMSS`` is the elapsed simulated time the snapshot is scheduled at.
Files are written atomically (temp file + rename), so a reader never sees half a file
and a snapshot rewritten after a crash simply replaces the same name.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trinity.controller.scenario import CATEGORIES as PATTERNS
from trinity.files import atomic_write_bytes

KINDS = {
    "costs": ("costs", "cost_snapshot"),
    "patterns": ("patterns", "pattern_stats"),
    "metrics": ("metrics", "system_metrics"),
}
AGENT_NAMES = ("WITNESS", "ARCHITECT", "EXECUTOR")


def hhmmss(sim_s: float) -> str:
    total = int(round(sim_s))
    return f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"


def snapshot_path(log_dir: Path, kind: str, sim_s: float) -> Path:
    folder, prefix = KINDS[kind]
    return log_dir / folder / f"{prefix}_{hhmmss(sim_s)}.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"),
                       durable=False)


def header(run_id: str, scheduled_sim_s: float, sampled_sim_s: float) -> dict[str, Any]:
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "elapsed_hours": round(scheduled_sim_s / 3600, 4),
        "run_id": run_id,
        "sampled_sim_elapsed_s": round(sampled_sim_s, 1),
    }


def cost_snapshot(totals: dict[str, Any], spent_last_hour_usd: float,
                  budget_usd: float) -> dict[str, Any]:
    """The plan's summary (total, calls, success rate, cost by agent) and the detail."""
    by_agent = {name: round(totals["by_agent"].get(name.lower(), {}).get("cost_usd", 0.0), 6)
                for name in AGENT_NAMES}
    return {
        "summary": {
            "total_cost_usd": totals["total_cost_usd"],
            "total_calls": totals["total_calls"],
            "success_rate": totals["success_rate"],
            "by_agent": by_agent,
        },
        "budget_usd": budget_usd,
        "budget_used_pct": round(totals["total_cost_usd"] / budget_usd * 100, 3)
        if budget_usd else None,
        "cost_last_hour_usd": round(spent_last_hour_usd, 6),
        "requests": totals["requests"],
        "by_status": totals["by_status"],
        "by_route": totals["by_route"],
        "local_share_calls": totals["local_share_calls"],
        "local_share_tokens": totals["local_share_tokens"],
        "input_tokens": totals["input_tokens"],
        "output_tokens": totals["output_tokens"],
        "calls_by_agent": {k: v["calls"] for k, v in totals["by_agent"].items()},
        "by_model": totals["by_model"],
        "by_provider": totals["by_provider"],
    }


def read_snapshots(log_dir: Path, kind: str,
                   run_id: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The run's snapshot files of ``kind`` (``KINDS``) by file name, in elapsed-time
    order, and the names of the files that are not a JSON object (torn or empty): each
    reader decides what those mean."""
    folder, prefix = KINDS[kind]
    found: dict[str, dict[str, Any]] = {}
    unreadable: list[str] = []
    for path in sorted((log_dir / folder).glob(f"{prefix}_*.json")):
        try:
            snap = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            snap = None
        if not isinstance(snap, dict):
            unreadable.append(path.name)
        elif snap.get("run_id") == run_id:
            found[path.name] = snap
    order = sorted(found, key=lambda name: (_elapsed(found[name]) or 0.0, name))
    return {name: found[name] for name in order}, unreadable


def _elapsed(snap: dict[str, Any]) -> float | None:
    hours = snap.get("elapsed_hours")
    return float(hours) if isinstance(hours, int | float) and not isinstance(hours, bool) \
        else None


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection (raises sqlite3.Error if the file is missing or unreadable)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
    conn.execute("PRAGMA busy_timeout=2000")
    return conn


def run_events(journal_conn: sqlite3.Connection, run_id: str) -> dict[str, tuple[str, float]]:
    """event_id -> (ground-truth category, simulated time emitted) for one run."""
    return {eid: (cat, float(sim)) for eid, cat, sim in journal_conn.execute(
        "SELECT event_id, category, sim_elapsed_s FROM events WHERE run_id=?", (run_id,))}


def run_detections(patterns_conn: sqlite3.Connection,
                   run_id: str) -> dict[str, tuple[str | None, float]]:
    """event_id -> (detected pattern or None, confidence) for one run's events."""
    return {eid: (pattern, float(conf)) for eid, pattern, conf in patterns_conn.execute(
        "SELECT event_id, pattern, confidence FROM detections WHERE run_id=?", (run_id,))}


def detection_scores(events: dict[str, tuple[str, float]],
                     detections: dict[str, tuple[str | None, float]]) -> dict[str, Any]:
    """Scored against the ground truth the controller recorded with each event."""
    processed = [(events[e][0], detections[e][0]) for e in events if e in detections]
    pattern_events = [(truth, got) for truth, got in processed if truth != "none"]
    noise = [(truth, got) for truth, got in processed if truth == "none"]
    detected = sum(got is not None for _, got in pattern_events)
    correct = sum((got or "none") == truth for truth, got in processed)
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


def pattern_stats(journal_conn: sqlite3.Connection, patterns_conn: sqlite3.Connection,
                  run_id: str, sim_s: float, interval_s: float) -> dict[str, Any]:
    events = run_events(journal_conn, run_id)
    detections = run_detections(patterns_conn, run_id)
    found = [(p, c) for p, c in detections.values() if p is not None]
    by_type = {name: sum(p == name for p, _ in found) for name in PATTERNS}
    conf_by_type = {name: round(sum(c for p, c in found if p == name) / by_type[name], 4)
                    for name in PATTERNS if by_type[name]}
    this_interval = [e for e, (_, t) in events.items() if sim_s - interval_s < t <= sim_s]
    new = 0
    for lo in range(0, len(this_interval), 900):
        chunk = this_interval[lo:lo + 900]
        new += patterns_conn.execute(
            f"SELECT count(*) FROM exemplars WHERE event_id IN ({','.join('?' * len(chunk))})",
            chunk).fetchone()[0]
    total, cross = patterns_conn.execute(
        "SELECT (SELECT count(*) FROM exemplars),"
        " (SELECT coalesce(sum(cross_session), 0) FROM detections)").fetchone()
    return {
        "detections": {
            "total": len(found),
            "by_type": by_type,
            "average_confidence": round(sum(c for _, c in found) / len(found), 4)
            if found else None,
            "average_confidence_by_type": conf_by_type,
        },
        "learning": {
            "total_patterns": int(total),
            "new_patterns_this_hour": int(new),
            "confidence_trend": confidence_trend(patterns_conn),
            "cross_session_matches": int(cross),
        },
        "scoring": detection_scores(events, detections),
    }


def confidence_trend(conn: sqlite3.Connection) -> float:
    """Mean confidence of the later half of all detections minus that of the earlier half
    (the pattern store is shared across runs: this is its learning over time)."""
    values = [float(r[0]) for r in conn.execute(
        "SELECT confidence FROM detections WHERE pattern IS NOT NULL"
        " ORDER BY detected_ms, rowid")]
    if len(values) < 2:
        return 0.0
    half = len(values) // 2
    later, earlier = values[half:], values[:half]
    return round(sum(later) / len(later) - sum(earlier) / len(earlier), 4)
