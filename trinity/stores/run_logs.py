"""The run's log folder (``logs/24h_test/`` by default): the test plan's layout, in one place.

::

    costs/cost_snapshot_HHMMSS.json       every snapshot interval, from the cost ledger
    patterns/pattern_stats_HHMMSS.json    every snapshot interval, from the pattern store
    metrics/system_metrics_HHMMSS.json    every metrics interval
    trinity.log                           JSON lines from every process
    alerts.log                            one JSON alert per line, each alert once
    test_config.json                      the effective configuration, secrets redacted
    persistence_before.json               the state captured before a kill-and-resume
    persistence_after.json                what the persistence check after it found

``HHMMSS`` is the elapsed simulated time the snapshot is scheduled at. Snapshot files
are written atomically (temp file + rename), so a reader never sees half a file and a
snapshot rewritten after a crash simply replaces the same name. A new run moves the
previous run's files to ``archive/<run id>/`` beside the folder (:func:`archive`).

JSON Lines (``alerts.log``) are read with ``jsonlines``: a torn last line (a process
killed while appending) is skipped, every other line is an alert.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonlines

from trinity.clock import now_ms
from trinity.files import atomic_write_bytes

# kind -> (folder, file name prefix)
KINDS = {
    "costs": ("costs", "cost_snapshot"),
    "patterns": ("patterns", "pattern_stats"),
    "metrics": ("metrics", "system_metrics"),
}
TRINITY_LOG = "trinity.log"
ALERTS_LOG = "alerts.log"
TEST_CONFIG = "test_config.json"
BEFORE_RESTART = "persistence_before.json"
AFTER_RESTART = "persistence_after.json"
# What one run leaves in the folder, and a new run moves to the archive.
RUN_LOGS = (*(folder for folder, _ in KINDS.values()), TRINITY_LOG, ALERTS_LOG, TEST_CONFIG,
            BEFORE_RESTART, AFTER_RESTART)
ARCHIVE = "archive"
# The bug-report drafts a failed run leaves beside its logs (``bug_report_<run id>.md``).
BUG_REPORTS = "bug_report_*.md"


def hhmmss(sim_s: float) -> str:
    total = int(round(sim_s))
    return f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"


def snapshot_path(log_dir: Path, kind: str, sim_s: float) -> Path:
    folder, prefix = KINDS[kind]
    return log_dir / folder / f"{prefix}_{hhmmss(sim_s)}.json"


def write_json(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    """A JSON document written whole (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"),
                       durable=durable)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None if it is missing, torn or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_snapshots(log_dir: Path, kind: str,
                   run_id: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The run's snapshot files of ``kind`` (``KINDS``) by file name, in elapsed-time
    order, and the names of the files that are not a JSON object (torn or empty): each
    reader decides what those mean."""
    folder, prefix = KINDS[kind]
    found: dict[str, dict[str, Any]] = {}
    unreadable: list[str] = []
    for path in sorted((log_dir / folder).glob(f"{prefix}_*.json")):
        snap = read_json(path)
        if snap is None:
            unreadable.append(path.name)
        elif snap.get("run_id") == run_id:
            found[path.name] = snap
    order = sorted(found, key=lambda name: (_elapsed(found[name]) or 0.0, name))
    return {name: found[name] for name in order}, unreadable


def snapshot_files(log_dir: Path, kind: str) -> list[Path]:
    """Every snapshot file of ``kind`` in the folder, newest schedule position first."""
    folder, prefix = KINDS[kind]
    return sorted((log_dir / folder).glob(f"{prefix}_*.json"),
                  key=lambda p: (len(p.name), p.name), reverse=True)


def _elapsed(snap: dict[str, Any]) -> float | None:
    hours = snap.get("elapsed_hours")
    return float(hours) if isinstance(hours, int | float) and not isinstance(hours, bool) \
        else None


def holds_run_logs(log_dir: Path) -> bool:
    return any((log_dir / name).exists() for name in RUN_LOGS)


def archive(log_dir: Path) -> Path | None:
    """Move the previous run's files out of ``log_dir`` (into ``archive/<run_id>`` beside
    it), so the folder holds exactly one run's snapshots, as the plan lays it out."""
    previous = read_json(log_dir / TEST_CONFIG) or {}
    run_id = str(previous.get("run_id") or "")
    present = [log_dir / name for name in RUN_LOGS if (log_dir / name).exists()]
    present += sorted(log_dir.glob(BUG_REPORTS))  # a failed run's draft goes with its logs
    if not present:
        return None
    target = log_dir.parent / ARCHIVE / (run_id or "unknown")
    if target.exists():
        target = target.with_name(f"{target.name}-{now_ms()}")
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)
    return target


def archived(log_dir: Path, run_id: str) -> Path:
    """Where a later run moved the logs of ``run_id``."""
    return log_dir.parent / ARCHIVE / run_id


# -- alerts.log ---------------------------------------------------------------------------

def _alert_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Every JSON object line of an alerts.log; torn or foreign lines are skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        reader = jsonlines.Reader(fh)
        while True:
            try:
                value = reader.read(allow_none=True)
            except EOFError:
                return
            except jsonlines.InvalidLineError:
                continue
            if isinstance(value, dict):
                yield value


def read_alerts(path: Path) -> list[dict[str, Any]]:
    """Every well-formed alert in an alerts.log (a torn last line is skipped)."""
    return list(_alert_lines(path))


# One alert a line, ASCII-escaped; what JSON cannot hold (a Path) is written as its text.
_ALERT_JSON = functools.partial(json.dumps, default=str)


class AlertLog:
    """``alerts.log``: one JSON object per line, each alert once even across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = {str(a["alert_id"]) for a in _alert_lines(path)
                                   if "alert_id" in a}

    def write_alert(self, alert: dict[str, Any], *, source: str) -> bool:
        """Append ``alert`` unless its id was written before; True if it was appended."""
        alert_id = str(alert.get("alert_id"))
        if alert_id in self._written:
            return False
        alert["alert_id"] = alert_id
        alert["source"] = source
        with jsonlines.open(self.path, mode="a", dumps=_ALERT_JSON) as log:
            log.write(alert)
        self._written.add(alert_id)
        return True
