"""``trinity export --format csv``: one run's recorded data, one CSV file per table.

``events.csv`` (one row per emitted event: its ground truth and WITNESS's detection; the
external events ``trinity emit`` journaled during the run follow the plan's, marked
``external``, with no cycle and no ground truth), ``outcomes.csv`` (one row per recorded
outcome, external events' included and marked), ``llm_calls.csv`` (one row per ledger
attempt), ``alerts.csv`` (the run's alerts from alerts.log) and ``metrics.csv`` (one row
per system_metrics sample). These are the rows the report is checked against, so they
are read as recorded, never recomputed: every store is opened read-only, everything is
read before anything is written, and each file is written atomically (temp file +
rename). Timestamps are ISO-8601 UTC with milliseconds; a missing value is an empty
cell; booleans are ``true``/``false``. A run that is still going exports what it has
recorded so far (the journal tables are read in one transaction, so every outcome's
event is in events.csv).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trinity.contract import ALERTS, NO_PATTERN, PROCESSES, QUEUES, WITNESS
from trinity.controller.reports.criteria import run_alerts
from trinity.db import reading
from trinity.errors import TrinityError
from trinity.files import atomic_write_bytes
from trinity.redaction import Redactor
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import patterns as pattern_store
from trinity.stores.costs import CallRecord
from trinity.stores.run_logs import KINDS, TEST_CONFIG, read_snapshots

FORMATS = ("csv",)
# external: the event came from ``trinity emit`` during the run (no cycle, no ground truth).
EVENT_COLUMNS = ("event_id", "cycle", "event_type", "emitted_at", "detected_pattern",
                 "confidence", "detection_latency_ms", "emitted_sim_s", "detected_at",
                 "external")
OUTCOME_COLUMNS = ("event_id", "task_id", "delegate", "status", "recorded_at", "external")
# The ledger's columns in its own order; its one timestamp (ts_ms) becomes ISO ``ts``.
CALL_FIELDS = tuple(f.name for f in fields(CallRecord))
CALL_COLUMNS = tuple("ts" if name == "ts_ms" else name for name in CALL_FIELDS)
# Stored as 0/1; written as the booleans they are.
CALL_FLAGS = frozenset(f.name for f in fields(CallRecord) if f.type in (bool, "bool"))
ALERT_COLUMNS = ("alert_id", "ts", "kind", "severity", "agent", "run_id", "source", "message",
                 "details")
METRIC_COLUMNS = ("timestamp", "elapsed_hours", "sim_elapsed_s", "cpu_percent", "memory_mb",
                  "memory_rss_total_mb", "memory_max_process_rss_mb",
                  "memory_growth_pct_per_hour", "disk_read_mb", "disk_write_mb")
# Known names come first in this order, so a normal run's columns never move; anything
# else a sample names follows, sorted.
QUEUE_COLUMNS = (*QUEUES, ALERTS)


class ExportError(TrinityError):
    """The run cannot be exported as asked (a store or log folder missing, unreadable,
    partly written, or not the run's); the message says which and what to do."""


@dataclass(frozen=True)
class Table:
    name: str
    columns: Sequence[str]
    rows: list[list[Any]]


def export_run(settings: Settings, log_dir: Path, run_id: str | None,
               output: Path) -> dict[str, int]:
    """Write the run's CSV files into ``output``; returns file name -> rows written.

    ``run_id`` None is the latest run. Raises ExportError before writing anything when
    the stores or the log folder cannot be read as the run's."""
    tables = read_tables(settings, log_dir, run_id)
    try:
        output.mkdir(parents=True, exist_ok=True)
        return {t.name: write_csv(output / t.name, t.columns, t.rows) for t in tables}
    except OSError as exc:
        raise ExportError(f"cannot write into {output}: {exc.strerror or exc}") from None


def read_tables(settings: Settings, log_dir: Path, run_id: str | None) -> list[Table]:
    with _reading(settings.messages_db) as journal:
        run, ended_ms, events, outcomes, recorded_metrics = _journal_rows(journal, run_id)
    _check_log_dir(log_dir, run.run_id)
    with _reading(settings.patterns_db) as patterns:
        detections = {e: (d.pattern, d.confidence, d.detected_ms)
                      for e, d in pattern_store.run_decisions(patterns, run.run_id).items()}
    with _reading(settings.costs_db) as ledger:
        calls = [tuple(row[name] for name in CALL_FIELDS)
                 for row in costs.calls(ledger, run.run_id, as_written=True)]
    samples = _metrics_samples(log_dir, run.run_id, recorded_metrics)
    databases = (settings.messages_db.name, settings.patterns_db.name, settings.costs_db.name)
    return [
        Table("events.csv", EVENT_COLUMNS, _event_rows(events, detections)),
        Table("outcomes.csv", OUTCOME_COLUMNS, [
            [event_id, "" if delegate == WITNESS and status == NO_PATTERN else task_id,
             delegate, status, iso_ms(recorded_ms), external]
            for event_id, task_id, delegate, status, recorded_ms, external in outcomes]),
        Table("llm_calls.csv", CALL_COLUMNS, [_call_row(row) for row in calls]),
        Table("alerts.csv", ALERT_COLUMNS,
              [_alert_row(a) for a in run_alerts(log_dir, run, ended_ms)]),
        _metrics_table(samples, databases),
    ]


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection whose SQLite errors become one ExportError naming the file."""
    if not path.is_file():
        raise ExportError(f"no {path.name} in {path.parent}: set TRINITY_DATA_DIR to the "
                          "folder that holds the run's stores")
    try:
        with reading(path) as conn:
            yield conn
    except sqlite3.Error as exc:
        raise ExportError(f"cannot read {path}: {exc} (not a Trinity store, or damaged)"
                          ) from None


def _journal_rows(conn: sqlite3.Connection, run_id: str | None) -> tuple[
        runs.Run, int | None, list[tuple[Any, ...]], list[tuple[Any, ...]], set[str]]:
    """The run, its end, events, outcomes and metrics snapshots written, in one read
    transaction (an outcome recorded meanwhile cannot lack its event)."""
    run = runs.get_run(conn, run_id) if run_id else runs.latest_run(conn)
    if run is None:
        known = [r.run_id for r in runs.all_runs(conn)[:5]]
        raise ExportError(
            f"no run {run_id!r} in the journal; the latest runs: {', '.join(known)}"
            if run_id and known else "no run recorded in the journal yet")
    emitted = sorted(runs.events(conn, run.run_id), key=lambda e: (e.cycle, e.noise))
    # The plan's events by cycle, then the external ones in the order they arrived.
    events: list[tuple[str, int | None, str | None, int, float, bool]] = [
        (e.event_id, e.cycle, e.category, e.emitted_ms, e.sim_elapsed_s, False) for e in emitted]
    events += [(e.event_id, None, None, e.emitted_ms, e.sim_elapsed_s, True)
               for e in runs.external_events(conn, run.run_id)]
    position = {e[0]: i for i, e in enumerate(events)}
    outcomes = [(o.event_id, o.task_id, o.delegate, o.status, o.recorded_ms, o.external)
                for o in sorted(runs.outcomes(conn, run.run_id),
                                key=lambda o: position[o.event_id])]
    written = {Path(p).name for p in runs.snapshots_written(conn, run.run_id).get("metrics", [])}
    return run, run.ended_ms, events, outcomes, written


def _check_log_dir(log_dir: Path, run_id: str) -> None:
    """The folder must be a run's log folder (its test_config.json) and that of ``run_id``."""
    if not log_dir.is_dir():
        raise ExportError(f"no log folder at {log_dir} (--input LOG_DIR, or TRINITY_LOG_DIR)")
    if not any(log_dir.iterdir()):
        raise ExportError(f"the log folder {log_dir} is empty: no run has written its logs there")
    config = log_dir / TEST_CONFIG
    try:
        logged = json.loads(config.read_text(encoding="utf-8"))["run_id"]
    except FileNotFoundError:
        raise ExportError(f"{log_dir} has no test_config.json: not a run's log folder, or one "
                          "only partly written") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{config} is unreadable ({type(exc).__name__}: {exc}): the log "
                          "folder is partly written") from None
    if logged != run_id:
        raise ExportError(
            f"{log_dir} holds the logs of run {logged}, not of run {run_id}: pass --run "
            f"{logged}, or --input with run {run_id}'s logs (a new run moves the previous "
            "run's logs to logs/archive/<run_id>)")


def _metrics_samples(log_dir: Path, run_id: str, recorded: set[str]) -> list[dict[str, Any]]:
    """The run's system_metrics samples in time order; every file the journal says was
    written must be there and whole."""
    found, unreadable = read_snapshots(log_dir, "metrics", run_id)
    folder = log_dir / KINDS["metrics"][0]
    if unreadable:
        raise ExportError(f"{folder / unreadable[0]} is unreadable (torn, empty or not a "
                          "metrics snapshot): the log folder is partly written")
    missing = sorted(recorded - set(found))
    if missing:
        raise ExportError(f"the log folder is partly written: {len(missing)} metrics snapshots "
                          f"the journal records as written are missing from {folder}"
                          f" (first: {missing[0]})")
    return list(found.values())


def _event_rows(events: list[tuple[Any, ...]],
                detections: dict[str, tuple[str | None, float, int]]) -> list[list[Any]]:
    rows = []
    for event_id, cycle, category, emitted_ms, sim_s, external in events:
        found = detections.get(event_id)
        if found is None:  # not classified yet
            rows.append([event_id, cycle, category, iso_ms(emitted_ms), None, None, None,
                         sim_s, None, external])
            continue
        pattern, confidence, detected_ms = found
        rows.append([event_id, cycle, category, iso_ms(emitted_ms), pattern, confidence,
                     detected_ms - emitted_ms, sim_s, iso_ms(detected_ms), external])
    return rows


def _call_row(row: tuple[Any, ...]) -> list[Any]:
    cells = dict(zip(CALL_FIELDS, row, strict=True))
    cells["ts_ms"] = iso_ms(cells["ts_ms"])
    for name in CALL_FLAGS:
        cells[name] = bool(cells[name])
    return list(cells.values())


def _alert_row(alert: dict[str, Any]) -> list[Any]:
    ts = alert.get("ts_ms")
    extra = {k: v for k, v in alert.items() if k not in ALERT_COLUMNS and k != "ts_ms"}
    details = alert.get("details")
    if isinstance(details, dict):
        extra.update(details)
    elif details is not None:
        extra["details"] = details
    return [alert.get("alert_id"),
            iso_ms(ts) if isinstance(ts, int) else iso_text(alert.get("ts")),
            alert.get("kind"), alert.get("severity"), alert.get("agent"), alert.get("run_id"),
            alert.get("source"), alert.get("message"),
            json.dumps(extra, sort_keys=True, default=str)]


def _metrics_table(samples: list[dict[str, Any]], databases: Sequence[str]) -> Table:
    """Totals, then one column per process (RSS), queue (backlog) and database (size)."""
    groups = (("processes", "rss_mb_", PROCESSES), ("queues", "queue_", QUEUE_COLUMNS),
              ("databases_mb", "db_mb_", databases))
    names = {key: _ordered(known, (n for s in samples for n in _mapping(s, key)))
             for key, _, known in groups}
    columns = [*METRIC_COLUMNS, *(prefix + name for key, prefix, _ in groups
                                  for name in names[key])]
    rows = []
    for s in samples:
        row = [iso_text(s.get("timestamp")), s.get("elapsed_hours"),
               s.get("sampled_sim_elapsed_s", s.get("sim_elapsed_s")),
               *(s.get(c) for c in METRIC_COLUMNS[3:])]
        processes = _mapping(s, "processes")
        row += [processes[n].get("rss_mb") if isinstance(processes.get(n), dict) else None
                for n in names["processes"]]
        row += [_mapping(s, key).get(n) for key in ("queues", "databases_mb") for n in names[key]]
        rows.append(row)
    return Table("metrics.csv", columns, rows)


def _mapping(sample: dict[str, Any], key: str) -> dict[str, Any]:
    value = sample.get(key)
    return value if isinstance(value, dict) else {}


def _ordered(known: Sequence[str], seen: Iterable[str]) -> list[str]:
    present = set(seen)
    return [n for n in known if n in present] + sorted(present - set(known))


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO-8601 UTC, exact to the millisecond."""
    if ms is None:
        return None
    ms = int(ms)
    stamp = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_text(value: Any) -> str | None:
    """An ISO-8601 timestamp as recorded, in the same UTC form as :func:`iso_ms`."""
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return value
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cell(value: Any, redact: Redactor) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return redact(value)
    return value


def write_csv(path: Path, columns: Sequence[str], rows: list[list[Any]]) -> int:
    """Write a header and ``rows`` to ``path`` atomically; returns the rows written."""
    redact = Redactor.from_env()  # this environment's secrets never reach an export
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows([_cell(v, redact) for v in row] for row in rows)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))
    return len(rows)
