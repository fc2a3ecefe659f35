"""The pattern store (``trinity_patterns.db``): what WITNESS knows and what it decided.

``exemplars`` (labelled texts with their embedding vectors: the shipped seed, what was
detected, corrections), ``detections`` (one per event: the pattern or none, the label,
the confidence, the nearest exemplar), ``patterns`` (per-pattern counts, first/last
seen, confidence sums, cross-session matches), ``sessions`` (each process that opened
the store), ``meta`` (the embedding the vectors and the index were made with) and,
with the Firestore backend, an ``outbox`` of records not yet in Firestore
(:mod:`trinity.stores.patterns.firestore`).

The tables are declared here and every statement on them is written in this package:
WITNESS's store (``agents/witness/store.py``, which keeps the FAISS index beside the
file) writes through the functions below, and the controller, the reports and the
operator commands read through them on a read-only connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trinity.contract import NONE
from trinity.db import create_schema

if TYPE_CHECKING:
    from sqlalchemy import MetaData

FILE = "trinity_patterns.db"
# Where an exemplar came from.
SEED, DETECTED, CORRECTION = "seed", "detected", "correction"


def declare(metadata: MetaData) -> None:
    """The pattern store's tables (SQLAlchemy Core; see ``trinity.stores.schema``)."""
    from sqlalchemy import BLOB, Column, Float, Index, Integer, Table, Text, text

    Table("meta", metadata,
          Column("key", Text, primary_key=True),
          Column("value", Text, nullable=False))
    Table("sessions", metadata,
          Column("session_id", Text, primary_key=True),
          Column("started_ms", Integer, nullable=False))
    exemplars = Table("exemplars", metadata,
          Column("id", Integer, primary_key=True),
          Column("label", Text, nullable=False),
          Column("text", Text, nullable=False),
          Column("source", Text, nullable=False),
          Column("origin", Text),
          Column("event_id", Text, unique=True),
          Column("confidence", Float),
          Column("session_id", Text, nullable=False),
          Column("created_ms", Integer, nullable=False),
          Column("vector", BLOB, nullable=False),
          # how many detections this exemplar stands for (a near-copy strengthens it
          # instead of adding a vector), and when the last of them was seen
          Column("hits", Integer, nullable=False, server_default=text("1")),
          Column("last_seen_ms", Integer),
          # ``text.key_of`` the normalised text: a near copy is found by it
          Column("text_key", Text))
    Index("exemplars_key", exemplars.c.text_key)
    detections = Table("detections", metadata,
                       Column("event_id", Text, primary_key=True),
                       Column("run_id", Text),
                       Column("session_id", Text, nullable=False),
                       Column("pattern", Text),
                       Column("label", Text, nullable=False),
                       Column("confidence", Float, nullable=False),
                       Column("detected_ms", Integer, nullable=False),
                       Column("nearest_id", Integer),
                       Column("nearest_similarity", Float),
                       Column("cross_session", Integer, nullable=False),
                       Column("latency_ms", Float),
                       # the text classified (what a correction of this event is about)
                       Column("text", Text))
    Index("detections_time", detections.c.detected_ms)
    Table("patterns", metadata,
          Column("pattern", Text, primary_key=True),
          Column("detections", Integer, nullable=False, server_default=text("0")),
          Column("confidence_sum", Float, nullable=False, server_default=text("0")),
          Column("first_seen_ms", Integer),
          Column("last_seen_ms", Integer),
          Column("cross_session_matches", Integer, nullable=False, server_default=text("0")))
    # A person's label for a text: the next event with the same normalised text (key), or
    # one whose nearest exemplar is this correction's and nearly identical, is decided as
    # corrected. ``was``: the decision corrected (a pattern, ``none``, or NULL when the
    # event was never decided); ``exemplar_id``: the exemplar the correction added;
    # ``relabelled_id``: the event's learned exemplar it relabelled.
    Table("corrections", metadata,
          Column("id", Integer, primary_key=True),
          Column("text_key", Text, nullable=False, unique=True),
          Column("event_id", Text),
          Column("label", Text, nullable=False),
          Column("was", Text),
          Column("text", Text, nullable=False),
          Column("source", Text, nullable=False),
          Column("corrected_ms", Integer, nullable=False),
          Column("exemplar_id", Integer),
          Column("relabelled_id", Integer))
    # Records not yet acknowledged by Firestore (only with the Firestore backend).
    Table("outbox", metadata,
          Column("seq", Integer, primary_key=True),
          Column("kind", Text, nullable=False),
          Column("key", Text, nullable=False))


# -- schema: generated from declare() by `make schema`; a test keeps it current --
DDL = (
    "CREATE TABLE IF NOT EXISTS meta (\"key\" TEXT NOT NULL, value TEXT NOT NULL, PRIMARY "
    "KEY (\"key\"))",
    "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT NOT NULL, started_ms INTEGER "
    "NOT NULL, PRIMARY KEY (session_id))",
    "CREATE TABLE IF NOT EXISTS exemplars (id INTEGER NOT NULL, label TEXT NOT NULL, "
    "text TEXT NOT NULL, source TEXT NOT NULL, origin TEXT, event_id TEXT, confidence "
    "FLOAT, session_id TEXT NOT NULL, created_ms INTEGER NOT NULL, vector BLOB NOT "
    "NULL, hits INTEGER DEFAULT 1 NOT NULL, last_seen_ms INTEGER, text_key TEXT, "
    "PRIMARY KEY (id), UNIQUE (event_id))",
    "CREATE INDEX IF NOT EXISTS exemplars_key ON exemplars (text_key)",
    "CREATE TABLE IF NOT EXISTS detections (event_id TEXT NOT NULL, run_id TEXT, "
    "session_id TEXT NOT NULL, pattern TEXT, label TEXT NOT NULL, confidence FLOAT NOT "
    "NULL, detected_ms INTEGER NOT NULL, nearest_id INTEGER, nearest_similarity FLOAT, "
    "cross_session INTEGER NOT NULL, latency_ms FLOAT, text TEXT, PRIMARY KEY "
    "(event_id))",
    "CREATE INDEX IF NOT EXISTS detections_time ON detections (detected_ms)",
    "CREATE TABLE IF NOT EXISTS patterns (pattern TEXT NOT NULL, detections INTEGER "
    "DEFAULT 0 NOT NULL, confidence_sum FLOAT DEFAULT 0 NOT NULL, first_seen_ms "
    "INTEGER, last_seen_ms INTEGER, cross_session_matches INTEGER DEFAULT 0 NOT NULL, "
    "PRIMARY KEY (pattern))",
    "CREATE TABLE IF NOT EXISTS corrections (id INTEGER NOT NULL, text_key TEXT NOT "
    "NULL, event_id TEXT, label TEXT NOT NULL, was TEXT, text TEXT NOT NULL, source "
    "TEXT NOT NULL, corrected_ms INTEGER NOT NULL, exemplar_id INTEGER, relabelled_id "
    "INTEGER, PRIMARY KEY (id), UNIQUE (text_key))",
    "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER NOT NULL, kind TEXT NOT NULL, \"key\" "
    "TEXT NOT NULL, PRIMARY KEY (seq))",
)
# Each table's columns: a store made before one existed gets it on open.
COLUMNS = {
    "meta": (
        "\"key\" TEXT NOT NULL",
        "value TEXT NOT NULL",
    ),
    "sessions": (
        "session_id TEXT NOT NULL",
        "started_ms INTEGER NOT NULL",
    ),
    "exemplars": (
        "id INTEGER NOT NULL",
        "label TEXT NOT NULL",
        "text TEXT NOT NULL",
        "source TEXT NOT NULL",
        "origin TEXT",
        "event_id TEXT",
        "confidence FLOAT",
        "session_id TEXT NOT NULL",
        "created_ms INTEGER NOT NULL",
        "vector BLOB NOT NULL",
        "hits INTEGER DEFAULT 1 NOT NULL",
        "last_seen_ms INTEGER",
        "text_key TEXT",
    ),
    "detections": (
        "event_id TEXT NOT NULL",
        "run_id TEXT",
        "session_id TEXT NOT NULL",
        "pattern TEXT",
        "label TEXT NOT NULL",
        "confidence FLOAT NOT NULL",
        "detected_ms INTEGER NOT NULL",
        "nearest_id INTEGER",
        "nearest_similarity FLOAT",
        "cross_session INTEGER NOT NULL",
        "latency_ms FLOAT",
        "text TEXT",
    ),
    "patterns": (
        "pattern TEXT NOT NULL",
        "detections INTEGER DEFAULT 0 NOT NULL",
        "confidence_sum FLOAT DEFAULT 0 NOT NULL",
        "first_seen_ms INTEGER",
        "last_seen_ms INTEGER",
        "cross_session_matches INTEGER DEFAULT 0 NOT NULL",
    ),
    "corrections": (
        "id INTEGER NOT NULL",
        "text_key TEXT NOT NULL",
        "event_id TEXT",
        "label TEXT NOT NULL",
        "was TEXT",
        "text TEXT NOT NULL",
        "source TEXT NOT NULL",
        "corrected_ms INTEGER NOT NULL",
        "exemplar_id INTEGER",
        "relabelled_id INTEGER",
    ),
    "outbox": (
        "seq INTEGER NOT NULL",
        "kind TEXT NOT NULL",
        "\"key\" TEXT NOT NULL",
    ),
}
# -- end of generated schema --


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing: tables, indexes, columns a store made earlier lacks (in
    the caller's write transaction)."""
    create_schema(conn, DDL, COLUMNS)


def has_schema(conn: sqlite3.Connection) -> bool:
    """Whether WITNESS has created the store's tables yet."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='detections'"
                        ).fetchone() is not None


# -- meta and sessions -----------------------------------------------------------------

def meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return str(row[0]) if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def start_session(conn: sqlite3.Connection, session_id: str, started_ms: int) -> None:
    conn.execute("INSERT INTO sessions VALUES (?, ?)", (session_id, started_ms))


# -- exemplars ---------------------------------------------------------------------------

def exemplar_labels(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    """(id, label, session) of every exemplar."""
    return [(int(i), label, session) for i, label, session in conn.execute(
        "SELECT id, label, session_id FROM exemplars")]


def exemplar_vectors(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
    """(id, float16 vector bytes) of every exemplar."""
    return [(int(i), bytes(blob)) for i, blob in conn.execute("SELECT id, vector FROM exemplars")]


def exemplar_texts(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(int(i), text) for i, text in conn.execute("SELECT id, text FROM exemplars")]


def set_vectors(conn: sqlite3.Connection, rows: Iterable[tuple[bytes, int]]) -> None:
    """(vector bytes, id): the exemplars re-embedded with another embedding table."""
    conn.executemany("UPDATE exemplars SET vector=? WHERE id=?", list(rows))


def add_exemplar(conn: sqlite3.Connection, *, label: str, text: str, source: str,
                 origin: str | None, session_id: str, created_ms: int, vector: bytes,
                 event_id: str | None = None, confidence: float | None = None,
                 text_key: str | None = None) -> int:
    """Store one exemplar; returns its id."""
    cur = conn.execute(
        "INSERT INTO exemplars(label, text, source, origin, event_id, confidence, session_id,"
        " created_ms, vector, text_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (label, text, source, origin, event_id, confidence, session_id, created_ms, vector,
         text_key))
    return int(cur.lastrowid or 0)


def exemplar_with_key(conn: sqlite3.Connection, text_key: str, label: str) -> int | None:
    """The first exemplar of ``label`` whose normalised text has ``text_key``, or None."""
    row = conn.execute("SELECT id FROM exemplars WHERE text_key=? AND label=? ORDER BY id"
                       " LIMIT 1", (text_key, label)).fetchone()
    return int(row[0]) if row else None


def strengthen_exemplars(conn: sqlite3.Connection, seen: Sequence[tuple[int, int]]) -> None:
    """(exemplar id, seen at ms): a detection nearly identical to the exemplar was made."""
    conn.executemany("UPDATE exemplars SET hits=hits+1, last_seen_ms=max(coalesce("
                     "last_seen_ms, 0), ?) WHERE id=?", [(ms, i) for i, ms in seen])


def exemplar_hits(conn: sqlite3.Connection) -> tuple[int, int]:
    """(exemplars, detections they stand for: each exemplar's hits summed)."""
    n, hits = conn.execute("SELECT count(*), coalesce(sum(hits), 0) FROM exemplars").fetchone()
    return int(n), int(hits)


def is_seeded(conn: sqlite3.Connection) -> bool:
    return conn.execute(f"SELECT 1 FROM exemplars WHERE source='{SEED}' LIMIT 1"
                        ).fetchone() is not None


def exemplar_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM exemplars").fetchone()[0])


def exemplars_by_source(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(k): int(v) for k, v in conn.execute(
        "SELECT source, count(*) FROM exemplars GROUP BY source")}


def learned_since(conn: sqlite3.Connection, since_ms: int) -> int:
    """Exemplars added since ``since_ms`` by anything but the seed."""
    return int(conn.execute(
        f"SELECT count(*) FROM exemplars WHERE created_ms >= ? AND source != '{SEED}'",
        (since_ms,)).fetchone()[0])


def learned_from(conn: sqlite3.Connection, event_ids: Sequence[str]) -> int:
    """How many of ``event_ids`` became exemplars."""
    found = 0
    for lo in range(0, len(event_ids), 900):
        chunk = event_ids[lo:lo + 900]
        found += int(conn.execute(
            f"SELECT count(*) FROM exemplars WHERE event_id IN ({','.join('?' * len(chunk))})",
            chunk).fetchone()[0])
    return found


# -- detections --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Decision:
    """What WITNESS decided about one event."""

    event_id: str
    pattern: str | None
    label: str
    confidence: float
    detected_ms: int
    latency_ms: float | None


def decision(conn: sqlite3.Connection, event_id: str) -> tuple[str | None, float] | None:
    """(pattern, confidence) recorded for ``event_id``, or None."""
    row = conn.execute("SELECT pattern, confidence FROM detections WHERE event_id=?",
                       (event_id,)).fetchone()
    return (row[0], float(row[1])) if row else None


def record_decision(conn: sqlite3.Connection, *, event_id: str, run_id: str | None,
                    session_id: str, pattern: str | None, label: str, confidence: float,
                    detected_ms: int, nearest_id: int | None,
                    nearest_similarity: float | None, cross_session: bool,
                    latency_ms: float | None, text: str | None = None) -> bool:
    """Record a decision once; False when the event was recorded before. A pattern's
    counts grow with it, in the same transaction."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO detections(event_id, run_id, session_id, pattern, label,"
        " confidence, detected_ms, nearest_id, nearest_similarity, cross_session, latency_ms,"
        " text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (event_id, run_id, session_id, pattern, label, confidence, detected_ms, nearest_id,
         nearest_similarity, int(cross_session), latency_ms, text))
    if cur.rowcount == 0:
        return False
    if pattern is not None:
        conn.execute(
            "INSERT INTO patterns(pattern, detections, confidence_sum, first_seen_ms,"
            " last_seen_ms, cross_session_matches) VALUES (?, 1, ?, ?, ?, ?)"
            " ON CONFLICT(pattern) DO UPDATE SET detections=detections+1,"
            " confidence_sum=confidence_sum+excluded.confidence_sum,"
            " last_seen_ms=excluded.last_seen_ms,"
            " cross_session_matches=cross_session_matches+excluded.cross_session_matches",
            (pattern, confidence, detected_ms, detected_ms, int(cross_session)))
    return True


def decided_text(conn: sqlite3.Connection, event_id: str) -> tuple[str, str | None] | None:
    """(the decision: a pattern or none, the text classified) for ``event_id``, or None
    when it was never decided here (the text is None for a decision recorded before
    texts were kept)."""
    row = conn.execute("SELECT coalesce(pattern, ?), text FROM detections WHERE event_id=?",
                       (NONE, event_id)).fetchone()
    return (str(row[0]), row[1]) if row else None


def run_decisions(conn: sqlite3.Connection, run_id: str) -> dict[str, Decision]:
    """Every decision WITNESS recorded for the run's events, by event id."""
    return {e: Decision(e, p, lab, float(c), int(t), None if ms is None else float(ms))
            for e, p, lab, c, t, ms in conn.execute(
                "SELECT event_id, pattern, label, confidence, detected_ms, latency_ms"
                " FROM detections WHERE run_id=?", (run_id,))}


def decision_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM detections").fetchone()[0])


def cross_session_matches(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(sum(cross_session), 0) FROM detections"
                            ).fetchone()[0])


def decision_totals(conn: sqlite3.Connection) -> tuple[int, int, float, int]:
    """(events decided, patterns detected, their average confidence, cross-session matches)."""
    n, detected, average, cross = conn.execute(
        "SELECT count(*), sum(pattern IS NOT NULL), avg(CASE WHEN pattern IS NOT NULL"
        " THEN confidence END), sum(cross_session) FROM detections").fetchone()
    return int(n or 0), int(detected or 0), float(average or 0.0), int(cross or 0)


def confidences(conn: sqlite3.Connection, *, pattern: str | None = None,
                run_id: str | None = None) -> list[float]:
    """The confidence of every detected pattern (only ``pattern``'s, only ``run_id``'s),
    in the order they were decided."""
    sql = "SELECT confidence FROM detections WHERE pattern IS NOT NULL"
    params: list[Any] = []
    if pattern is not None:
        sql += " AND pattern=?"
        params.append(pattern)
    if run_id is not None:
        sql += " AND run_id=?"
        params.append(run_id)
    return [float(r[0]) for r in conn.execute(sql + " ORDER BY detected_ms, rowid", params)]


# -- per-pattern counts -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PatternCounts:
    pattern: str
    detections: int
    confidence_sum: float
    first_seen_ms: int | None
    last_seen_ms: int | None
    cross_session_matches: int


def pattern_counts(conn: sqlite3.Connection) -> list[PatternCounts]:
    return [PatternCounts(p, int(n), float(s), first, last, int(cross))
            for p, n, s, first, last, cross in conn.execute(
                "SELECT pattern, detections, confidence_sum, first_seen_ms, last_seen_ms,"
                " cross_session_matches FROM patterns ORDER BY pattern")]


# -- corrections --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Correction:
    id: int
    text_key: str
    event_id: str | None
    label: str
    was: str | None
    exemplar_id: int | None
    relabelled_id: int | None


def learned_exemplar(conn: sqlite3.Connection, event_id: str) -> tuple[int, str] | None:
    """(id, label) of the exemplar WITNESS learned from ``event_id``, if it learned one."""
    row = conn.execute("SELECT id, label FROM exemplars WHERE event_id=? AND source=?",
                       (event_id, DETECTED)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def relabel_exemplar(conn: sqlite3.Connection, exemplar_id: int, label: str) -> None:
    conn.execute("UPDATE exemplars SET label=? WHERE id=?", (label, exemplar_id))


def exemplar_rows(conn: sqlite3.Connection, ids: Sequence[int]
                  ) -> list[tuple[int, str, str, bytes]]:
    """(id, label, session, float16 vector bytes) of the exemplars ``ids``."""
    found = []
    for lo in range(0, len(ids), 900):
        chunk = list(ids[lo:lo + 900])
        found += [(int(i), label, session, bytes(blob)) for i, label, session, blob in
                  conn.execute("SELECT id, label, session_id, vector FROM exemplars WHERE id IN"
                               f" ({','.join('?' * len(chunk))})", chunk)]
    return found


def record_correction(conn: sqlite3.Connection, *, text_key: str, event_id: str | None,
                      label: str, was: str | None, text: str, source: str, corrected_ms: int,
                      exemplar_id: int | None, relabelled_id: int | None) -> int:
    """Record a person's label for a text; a later correction of the same text replaces
    it. Returns the correction's id."""
    conn.execute(
        "INSERT INTO corrections(text_key, event_id, label, was, text, source, corrected_ms,"
        " exemplar_id, relabelled_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(text_key) DO UPDATE SET event_id=excluded.event_id,"
        " label=excluded.label, was=excluded.was, text=excluded.text,"
        " source=excluded.source, corrected_ms=excluded.corrected_ms,"
        " exemplar_id=excluded.exemplar_id, relabelled_id=excluded.relabelled_id",
        (text_key, event_id, label, was, text, source, corrected_ms, exemplar_id,
         relabelled_id))
    return int(conn.execute("SELECT id FROM corrections WHERE text_key=?",
                            (text_key,)).fetchone()[0])


def correction_of(conn: sqlite3.Connection, text_key: str) -> Correction | None:
    row = conn.execute("SELECT id, text_key, event_id, label, was, exemplar_id, relabelled_id"
                       " FROM corrections WHERE text_key=?", (text_key,)).fetchone()
    return Correction(*row) if row else None


def corrections(conn: sqlite3.Connection) -> list[Correction]:
    """Every correction, oldest first."""
    return [Correction(*row) for row in conn.execute(
        "SELECT id, text_key, event_id, label, was, exemplar_id, relabelled_id"
        " FROM corrections ORDER BY id")]


def corrections_version(conn: sqlite3.Connection) -> tuple[int, int]:
    """Changes whenever a correction is recorded or replaced (a cheap poll)."""
    n, last = conn.execute("SELECT count(*), coalesce(max(corrected_ms), 0) FROM corrections"
                           ).fetchone()
    return int(n), int(last)


def correction_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Per label: corrections that made it the answer (``to``) and that took it away
    (``from``: the decision they corrected)."""
    counts: dict[str, dict[str, int]] = {}
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='corrections'"
                    ).fetchone() is None:  # a store made before corrections were kept
        return counts
    for label, was, n in conn.execute(
            "SELECT label, coalesce(was, ''), count(*) FROM corrections GROUP BY label, was"):
        counts.setdefault(str(label), {"to": 0, "from": 0})["to"] += int(n)
        if was:
            counts.setdefault(str(was), {"to": 0, "from": 0})["from"] += int(n)
    return dict(sorted(counts.items()))
