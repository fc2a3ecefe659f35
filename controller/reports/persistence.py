"""What must survive a restart, captured before it and checked after it.

``capture`` reads the run's cycle position, events and outcomes, the pattern store's
exemplars and per-pattern counts, the cost ledger's totals and every queue's head
and cursor. ``validate`` checks the stores are readable and consistent (cycles
contiguous and unrepeated, each queue's unapplied messages still in the journal)
and, given an earlier capture, that nothing went backwards.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from trinity.clock import now_ms
from trinity.db import open_readonly, reading
from trinity.errors import ConfigError
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import journal as journal_store
from trinity.stores import patterns as pattern_store
from trinity.stores.run_logs import BEFORE_RESTART, read_json, write_json


def pattern_counts(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"exemplars": 0, "detections": 0, "by_pattern": {}}
    with reading(path) as conn:
        return {"exemplars": pattern_store.exemplar_count(conn),
                "detections": pattern_store.decision_count(conn),
                "by_pattern": {c.pattern: c.detections
                               for c in pattern_store.pattern_counts(conn)}}


def _costs(path: Path, run_id: str) -> dict[str, Any]:
    if not path.exists():
        return {"calls": 0, "total_cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0}
    with reading(path) as conn:
        return costs.run_spend(conn, run_id)


def _queues(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    return {f"{b.stream}->{b.consumer}": {"head": b.head, "cursor": b.cursor}
            for b in journal_store.backlogs(conn)}


def capture(settings: Settings) -> dict[str, Any]:
    """The state of the latest run and of the shared stores (raises sqlite3.Error)."""
    with reading(settings.messages_db) as conn:
        run = runs.latest_run(conn)
        if run is None:
            raise sqlite3.DatabaseError(f"{settings.messages_db.name}: no run recorded")
        progress = runs.progress(conn, run.run_id)
        outcomes = len(runs.outcomes(conn, run.run_id))
        queues = _queues(conn)
    return {
        "captured_ms": now_ms(),
        "run_id": run.run_id,
        "status": run.status,
        "sim_elapsed_s": run.sim_elapsed_s,
        "last_cycle": progress["last_cycle"],
        "events": progress["emitted"],
        "events_with_outcome": progress["completed"],
        "outcomes": outcomes,
        "patterns": pattern_counts(settings.patterns_db),
        "costs": _costs(settings.costs_db, run.run_id),
        "queues": queues,
    }


def save_before(settings: Settings, state: dict[str, Any]) -> Path:
    path = settings.log_dir / BEFORE_RESTART
    write_json(path, state, durable=True)
    return path


def load_before(settings: Settings, run_id: str) -> dict[str, Any] | None:
    state = read_json(settings.log_dir / BEFORE_RESTART)
    return state if state is not None and state.get("run_id") == run_id else None


def last_capture(settings: Settings) -> dict[str, Any] | None:
    """The state captured before the latest run's last kill-and-resume, if there is one
    (None too when the stores cannot be read: ``validate`` says why)."""
    if not settings.messages_db.exists():
        return None
    try:
        run_id = capture(settings)["run_id"]
    except sqlite3.Error:
        return None
    return load_before(settings, run_id)


def _consistency(settings: Settings, run_id: str) -> list[str]:
    problems: list[str] = []
    with reading(settings.messages_db) as conn:
        cycles = sorted(e.cycle for e in runs.events(conn, run_id) if e.noise == 0)
        if cycles != list(range(1, len(cycles) + 1)):
            missing = sorted(set(range(1, max(cycles, default=0) + 1)) - set(cycles))
            problems.append(f"cycles are not contiguous from 1: missing {missing[:10]}")
        for b in journal_store.backlogs(conn):
            if b.cursor > b.head:
                problems.append(f"queue {b.stream}->{b.consumer}: cursor {b.cursor} beyond "
                                f"head {b.head}")
                continue
            kept = journal_store.journaled_between(conn, b.stream, b.cursor, b.head)
            if kept != b.pending:
                problems.append(f"queue {b.stream}->{b.consumer}: {b.pending - kept} of "
                                f"{b.pending} unapplied messages missing from the journal")
    return problems


# How long validation waits for WITNESS to send what its outbox still holds (it sends
# it as soon as it is up again after a restart).
FIRESTORE_GRACE_S = 30.0


def firestore_state(settings: Settings, run_id: str,
                    grace_s: float = FIRESTORE_GRACE_S) -> tuple[dict[str, Any], list[str]]:
    """The run's detections and the pattern counters as Firestore holds them, checked
    against the local store (every detection of the run there, no counter below)."""
    from google.api_core import exceptions as gexc

    from trinity.stores.patterns.firestore import FirestoreReplica, last_queued, pending

    problems: list[str] = []
    # Not one read transaction: the outbox is read again while WITNESS empties it.
    conn = open_readonly(settings.patterns_db)
    try:
        # Read in this order: a detection's outbox row commits with it, so every
        # detection read here has its row at or below ``last``.
        local = {e: d.pattern for e, d in pattern_store.run_decisions(conn, run_id).items()}
        counters = {c.pattern: c.detections for c in pattern_store.pattern_counts(conn)}
        last = last_queued(conn)
        deadline = time.monotonic() + grace_s
        while (queued := pending(conn, last)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        conn.close()
    if queued:
        problems.append(f"{queued} pattern-store records not yet in Firestore (outbox)")
    project = settings.firestore_project
    try:
        replica = FirestoreReplica(project)
        try:
            remote = replica.run_detections(run_id)
            remote_counters = replica.pattern_counters()
        finally:
            replica.close()
    except (gexc.GoogleAPIError, OSError, ConfigError) as exc:
        return {}, [f"cannot query Firestore project {project}: {exc}"]
    missing = sorted(set(local) - set(remote))
    if missing:
        problems.append(f"{len(missing)} of the run's {len(local)} detections are missing "
                        f"from Firestore: {', '.join(missing[:5])}")
    for pattern, count in sorted(counters.items()):
        if (remote_counters.get(pattern) or 0) < count:
            problems.append(f"Firestore counts {remote_counters.get(pattern)} {pattern} "
                            f"detections, the local store {count}")
    by_pattern: dict[str, int] = {}
    for decided in remote.values():
        if decided:
            by_pattern[decided] = by_pattern.get(decided, 0) + 1
    return {"project": project, "run_detections": len(remote),
            "run_detections_by_pattern": by_pattern, "patterns": remote_counters}, problems


def _not_less(problems: list[str], what: str, before: float, after: float) -> None:
    if after < before:
        problems.append(f"{what} went down: {before} before, {after} after")


def validate(settings: Settings, before: dict[str, Any] | None = None) -> tuple[
        dict[str, Any] | None, list[str]]:
    """(state now, problems); no problems means persistence holds."""
    problems: list[str] = []
    for path in (settings.messages_db, settings.patterns_db, settings.costs_db):
        if not path.exists():
            problems.append(f"{path.name} is missing from {path.parent}")
    try:
        after = capture(settings)
        problems += _consistency(settings, after["run_id"])
    except sqlite3.Error as exc:
        return None, [*problems, f"cannot read the stores: {exc}"]
    if after["patterns"]["exemplars"] == 0:
        problems.append("the pattern store has no exemplars")
    if settings.pattern_backend == "firestore":
        after["firestore"], found = firestore_state(settings, after["run_id"])
        problems += found
    if before is None:
        return after, problems
    if before.get("run_id") != after["run_id"]:
        problems.append(f"run changed: {before.get('run_id')} before, {after['run_id']} after")
        return after, problems
    return after, problems + _went_back(before, after)


def _went_back(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What is less after a restart than it was before it."""
    problems: list[str] = []
    _not_less(problems, "last cycle", before["last_cycle"], after["last_cycle"])
    _not_less(problems, "events", before["events"], after["events"])
    _not_less(problems, "outcomes", before["outcomes"], after["outcomes"])
    _not_less(problems, "simulated time", before["sim_elapsed_s"], after["sim_elapsed_s"])
    for key in ("exemplars", "detections"):
        _not_less(problems, f"pattern store {key}", before["patterns"][key],
                  after["patterns"][key])
    for pattern, count in before["patterns"]["by_pattern"].items():
        _not_less(problems, f"{pattern} detections", count,
                  after["patterns"]["by_pattern"].get(pattern, 0))
    for key in ("calls", "total_cost_usd", "input_tokens", "output_tokens"):
        _not_less(problems, f"cost ledger {key}", before["costs"][key], after["costs"][key])
    for queue, position in before["queues"].items():
        now = after["queues"].get(queue)
        if now is None:
            problems.append(f"queue {queue} is gone")
            continue
        _not_less(problems, f"queue {queue} head", position["head"], now["head"])
        _not_less(problems, f"queue {queue} cursor", position["cursor"], now["cursor"])
    return problems
