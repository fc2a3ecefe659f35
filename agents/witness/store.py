"""WITNESS's pattern store: the SQLite record with a FAISS index over its exemplars.

SQLite (``trinity_patterns.db``, its tables and queries are ``trinity.stores.patterns``)
is the record: exemplars with their vectors, every detection, and per-pattern counts,
first/last seen and confidence sums.
FAISS (``trinity_patterns.faiss``) is a derived index for nearest-exemplar search (an
HNSW graph, see ``exemplars.vector_index``).
On every open the index is checked against SQLite (same ids, same count, built
from the same embedding table) and rebuilt from the stored vectors when it is not,
so a stale index cannot survive a restart. The index is saved on close and every
``SAVE_EVERY`` additions; a crash in between only costs a rebuild.

Each process that opens the store starts a *session*; a detection whose nearest
exemplar was stored by an earlier session is a cross-session match, which is how
learning across restarts is measured.

Writes are idempotent by event id, so a message re-applied after a crash neither
counts nor learns twice. Learning is bounded: a detection that nearly copies an exemplar
of its pattern (the same normalised text, or ``NEAR_COPY`` similar) strengthens that
exemplar (``hits``, ``last_seen_ms``) instead of adding a vector, and past
``MAX_EXEMPLARS`` every detection strengthens its nearest exemplar of the pattern.

A *correction* (``trinity witness correct``) is a person's label for an event's text:
it relabels what WITNESS learned from that event, adds the text as an exemplar of the
right label, and from then on an event with the same normalised text, or whose nearest
exemplar is the correction's and nearly identical (``NEAR_IDENTICAL``), is decided as
corrected. Corrections live in the store, so they hold across restarts; a running
WITNESS picks up those another process recorded (``refresh_corrections``).

With a Firestore replica (``TRINITY_PATTERN_BACKEND=firestore``, see
``trinity.stores.patterns.firestore``) Firestore is the record: the store takes what
Firestore has on open, before its index is checked, and every write also queues its
records in an ``outbox`` table (same SQLite transaction) that a thread sends to Firestore.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.exemplars import Neighbour, tune_index, vector_index
from trinity.agents.witness.model import Detection
from trinity.agents.witness.text import key_of, normalise
from trinity.clock import now_ms
from trinity.contract import LABELS
from trinity.db import connect, immediate, make_private
from trinity.errors import JournalError
from trinity.stores import patterns as store
from trinity.stores.patterns.firestore import FirestoreReplica, outbox_add

log = logging.getLogger(__name__)

SAVE_EVERY = 200
# A detection counts as a match against an exemplar when they are this similar. In the
# joint MiniLM + WordLlama space, 60 % of dev-set events have a neighbour this close from
# another repository, and 96 % of those neighbours share the event's label.
MATCH_SIMILARITY = 0.65
# An event this similar to a correction's text is decided as corrected: the same text
# with another id, path, number or a word changed (a different sentence on the same
# topic sits near 0.8).
NEAR_IDENTICAL = 0.95
# A detection nearly identical to an exemplar of its pattern strengthens that exemplar
# (its hits and last-seen time) instead of adding its vector: a recurring event teaches
# what its first occurrence did, so memory and search cost follow what is new, not how
# much arrives.
NEAR_COPY = NEAR_IDENTICAL
# At most this many exemplars (~1.3 KB each in the index, ~65 MB at the cap): past it a
# detection strengthens its nearest exemplar of the same pattern instead of adding one.
MAX_EXEMPLARS = 50_000


def text_key(text: str) -> str:
    """A text's key (a correction's, an exemplar's): the text normalised (numbers, ids,
    paths, times masked), hashed."""
    return key_of(normalise(text))


def _storable(text: str) -> str:
    """Text SQLite can store: lone surrogates (from undecodable bytes) become U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True)
class Recorded:
    """One detection to record (``PatternStore.record_many``)."""

    detection: Detection
    event_id: str
    run_id: str | None = None
    latency_ms: float | None = None


@dataclass(frozen=True)
class StoredDetection:
    event_id: str
    pattern: str | None
    confidence: float


class PatternStore:
    def __init__(self, path: Path, embedder: Embedder,
                 replica: FirestoreReplica | None = None, *,
                 max_exemplars: int = MAX_EXEMPLARS) -> None:
        self.path = path
        self.max_exemplars = max_exemplars
        self._full_logged = False
        self.replica = replica
        self.index_path = path.with_suffix(".faiss")
        self.embedder = embedder
        self.session_id = uuid.uuid4().hex
        self._unsaved = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = connect(path, timeout_s=10)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self._write() as conn:
                store.ensure_schema(conn)
                store.start_session(conn, self.session_id, now_ms())
                self._queue(conn, "session", [self.session_id])
            if replica is not None:
                replica.sync(self.conn)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open pattern store {path}: {exc}") from exc
        self._labels: dict[int, tuple[str, str]] = {}  # exemplar id -> (label, session)
        self.index = self._load_index()
        self._corrected: dict[str, str] = {}  # text key -> label
        self._correction_exemplars: set[int] = set()
        self._corrections_seen: tuple[int, int] | None = None
        self.refresh_corrections()
        if replica is not None:
            replica.start(self._connect)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, timeout_s=10, check_same_thread=False)

    def _queue(self, conn: sqlite3.Connection, kind: str, keys: Sequence[Any]) -> None:
        """Records for Firestore, in the writer's transaction (no replica: nothing)."""
        if self.replica is not None and keys:
            outbox_add(conn, kind, keys)

    # -- storage ------------------------------------------------------------

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self.conn)

    def _load_index(self) -> Any:
        """Load the FAISS index if it matches SQLite exactly; otherwise rebuild it."""
        fingerprint = self.embedder.fingerprint
        reembedded = store.meta(self.conn, "embedding") not in (None, fingerprint)
        if reembedded:
            self._reembed()
        with self._write() as conn:
            store.set_meta(conn, "embedding", fingerprint)
        self._labels = {i: (label, session)
                        for i, label, session in store.exemplar_labels(self.conn)}
        index = None
        # After a re-embedding the saved index holds the old vectors under the same ids.
        if (self.index_path.exists() and not reembedded
                and store.meta(self.conn, "index_fingerprint") == fingerprint):
            try:
                index = tune_index(faiss.read_index(str(self.index_path)))
            except RuntimeError:
                index = None
        if index is not None and self._agrees(index):
            self.rebuilt = False
            return index
        self.rebuilt = True
        return self._rebuild()

    def _agrees(self, index: Any) -> bool:
        if index.ntotal != len(self._labels) or index.d != self.embedder.dim:
            return False
        # an index of another kind (a store written on another machine, or before the
        # kind was chosen per build) is rebuilt from the stored vectors: same values
        if type(faiss.downcast_index(index.index)) is not type(vector_index(1)):
            return False
        ids = faiss.vector_to_array(index.id_map)
        return bool(np.array_equal(np.sort(ids), np.array(sorted(self._labels), dtype=np.int64)))

    def _rebuild(self) -> faiss.IndexIDMap2:
        index = faiss.IndexIDMap2(vector_index(self.embedder.dim))
        ids, vectors = [], []
        for exemplar_id, blob in store.exemplar_vectors(self.conn):
            ids.append(exemplar_id)
            vectors.append(np.frombuffer(blob, dtype=np.float16))
        if ids:
            index.add_with_ids(np.stack(vectors).astype(np.float32), np.array(ids, dtype=np.int64))
        self.index = index
        self.save_index()
        return index

    def _reembed(self) -> None:
        """The embedding table changed: stored vectors are from another space."""
        rows = store.exemplar_texts(self.conn)
        with self._write() as conn:
            for lo in range(0, len(rows), 1000):
                chunk = rows[lo:lo + 1000]
                vectors = self.embedder.embed([text for _, text in chunk])
                store.set_vectors(conn, [
                    (vec.astype(np.float16).tobytes(), exemplar_id)
                    for (exemplar_id, _), vec in zip(chunk, vectors, strict=True)])
                self._queue(conn, "exemplar", [exemplar_id for exemplar_id, _ in chunk])

    def save_index(self) -> None:
        tmp = self.index_path.with_suffix(f".faiss.{os.getpid()}.tmp")
        make_private(tmp)  # faiss keeps the mode of the file it overwrites
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, self.index_path)
        with self._write() as conn:
            store.set_meta(conn, "index_fingerprint", self.embedder.fingerprint)
        self._unsaved = 0

    def close(self) -> None:
        if self.replica is not None:
            self.replica.stop()
        if self._unsaved:
            self.save_index()
        self.conn.close()

    # -- exemplars ------------------------------------------------------------

    def exemplar_count(self) -> int:
        return len(self._labels)

    def add_exemplars(
        self,
        items: Sequence[tuple[str, str, str | None]],
        *,
        source: str,
        vectors: np.ndarray | None = None,
    ) -> list[int]:
        """Store (text, label, origin) exemplars; returns their ids."""
        if not items:
            return []
        if vectors is None:
            vectors = self.embedder.embed([text for text, _, _ in items])
        ts = now_ms()
        ids = []
        with self._write() as conn:
            for (text, label, origin), vec in zip(items, vectors, strict=True):
                ids.append(store.add_exemplar(
                    conn, label=label, text=_storable(text), source=source, origin=origin,
                    session_id=self.session_id, created_ms=ts,
                    vector=vec.astype(np.float16).tobytes(), text_key=text_key(text)))
            self._queue(conn, "exemplar", ids)
        self._index_add(ids, vectors, [label for _, label, _ in items])
        self._wake()
        return ids

    def _index_add(self, ids: list[int], vectors: np.ndarray, labels: list[str]) -> None:
        stored = np.asarray(vectors, dtype=np.float16).astype(np.float32).reshape(len(ids), -1)
        self.index.add_with_ids(stored, np.array(ids, dtype=np.int64))
        for exemplar_id, label in zip(ids, labels, strict=True):
            self._labels[exemplar_id] = (label, self.session_id)
        self._unsaved += len(ids)
        if self._unsaved >= SAVE_EVERY:
            self.save_index()

    def seed(self, examples: Iterable[tuple[str, str, str]]) -> int:
        """Load the shipped labelled examples once (a fresh store); returns how many."""
        if store.is_seeded(self.conn):
            return 0
        return len(self.add_exemplars(list(examples), source=store.SEED))

    def search(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        """Nearest exemplars, best first (the detector's NeighbourSearch)."""
        return self.search_many(np.asarray(vector).reshape(1, -1), k)[0]

    def search_many(self, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        """``search`` for each row of ``vectors``, in one index search."""
        queries = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if self.index.ntotal == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        sims, ids = self.index.search(queries, min(k, self.index.ntotal))
        found: list[list[Neighbour]] = []
        for srow, irow in zip(sims, ids, strict=True):
            row = []
            for sim, exemplar_id in zip(srow, irow, strict=True):
                if exemplar_id < 0:
                    continue
                label, session = self._labels[int(exemplar_id)]
                row.append(Neighbour(int(exemplar_id), float(sim), label, session))
            found.append(row)
        return found

    # -- detections -----------------------------------------------------------

    def detection(self, event_id: str) -> StoredDetection | None:
        event_id = _storable(event_id)
        found = store.decision(self.conn, event_id)
        return StoredDetection(event_id, *found) if found else None

    def record(
        self,
        detection: Detection,
        *,
        event_id: str,
        text: str | None = None,
        run_id: str | None = None,
        learn: bool = True,
        latency_ms: float | None = None,
    ) -> bool:
        """Record a detection once; with ``learn``, a detected pattern is learned (see
        ``record_many``). ``text`` defaults to the detection's. Returns False when this
        event was recorded before (nothing changes)."""
        if text is not None and text != detection.text:
            detection = replace(detection, text=text)
        return self.record_many([Recorded(detection, event_id, run_id, latency_ms)],
                                learn=learn)[0]

    def record_many(self, items: Sequence[Recorded], *, learn: bool = True) -> list[bool]:
        """Record detections in one transaction, each once (False: recorded before).

        With ``learn`` a detected pattern becomes an exemplar, unless it is a near copy
        (``NEAR_COPY``) of an exemplar of that pattern, known or added earlier in this
        batch, or the store is full (``max_exemplars``: then its nearest exemplar of the
        pattern among its neighbours, if any): that exemplar is strengthened instead.
        """
        ts = now_ms()
        fresh: list[bool] = []
        added: list[tuple[int, np.ndarray, str, str]] = []  # (id, stored vector, label, key)
        strengthened: list[tuple[int, int]] = []
        with self._write() as conn:
            for item in items:
                det = item.detection
                event_id = _storable(item.event_id)
                nearest = det.neighbours[0] if det.neighbours else None
                cross = (det.pattern is not None and nearest is not None
                         and nearest.session_id != self.session_id
                         and nearest.similarity >= MATCH_SIMILARITY
                         and nearest.label == det.pattern)
                new = store.record_decision(
                    conn, event_id=event_id, run_id=item.run_id, session_id=self.session_id,
                    pattern=det.pattern, label=det.label, confidence=det.confidence,
                    detected_ms=ts, nearest_id=nearest.exemplar_id if nearest else None,
                    nearest_similarity=nearest.similarity if nearest else None,
                    cross_session=cross, latency_ms=item.latency_ms,
                    text=_storable(det.text))
                fresh.append(new)
                if not new:
                    continue
                self._queue(conn, "detection", [event_id])
                if det.pattern is None or not learn:
                    continue
                vector = det.vector.astype(np.float16)
                key = det.key or text_key(det.text)
                target = self._near_copy(conn, det, key, vector, added)
                if target is None and len(self._labels) + len(added) >= self.max_exemplars:
                    self._log_full()
                    target = next((n.exemplar_id for n in det.neighbours
                                   if n.label == det.pattern), None)
                    if target is None:  # full, and nothing of the pattern near: not learned
                        continue
                if target is not None:
                    strengthened.append((target, ts))
                    continue
                new_id = store.add_exemplar(
                    conn, label=det.pattern, text=_storable(det.text), source=store.DETECTED,
                    origin=None, event_id=event_id, confidence=det.confidence,
                    session_id=self.session_id, created_ms=ts, vector=vector.tobytes(),
                    text_key=key)
                added.append((new_id, vector, det.pattern, key))
            if strengthened:
                store.strengthen_exemplars(conn, strengthened)
            self._queue(conn, "exemplar", sorted({a[0] for a in added}
                                                 | {i for i, _ in strengthened}))
        if added:
            self._index_add([a[0] for a in added], np.stack([a[1] for a in added]),
                            [a[2] for a in added])
        self._wake()
        return fresh

    @staticmethod
    def _near_copy(conn: sqlite3.Connection, det: Detection, key: str, vector: np.ndarray,
                   added: Sequence[tuple[int, np.ndarray, str, str]]) -> int | None:
        """The exemplar of ``det``'s pattern that ``det`` nearly copies, or None: one with
        the same key (the text with other numbers, ids, paths or times) or nearly the same
        vector (``NEAR_COPY``), known or added earlier in this batch."""
        assert det.pattern is not None
        for n in det.neighbours:
            if n.similarity < NEAR_COPY:
                break
            if n.label == det.pattern:
                return n.exemplar_id
        same = [(i, v) for i, v, label, k in added if label == det.pattern]
        for i, _, label, k in added:
            if k == key and label == det.pattern:
                return i
        found = store.exemplar_with_key(conn, key, det.pattern)
        if found is not None:
            return found
        if same:
            sims = np.stack([v for _, v in same]).astype(np.float32) @ vector.astype(np.float32)
            best = int(sims.argmax())
            if sims[best] >= NEAR_COPY:
                return same[best][0]
        return None

    def _log_full(self) -> None:
        if not self._full_logged:
            self._full_logged = True
            log.warning("the pattern store holds %d exemplars, its maximum: detections now "
                        "strengthen their nearest exemplar instead of adding one",
                        self.max_exemplars)

    def _wake(self) -> None:
        if self.replica is not None:
            self.replica.wake()

    # -- corrections ------------------------------------------------------------

    def correct(self, event_id: str | None, label: str, text: str | None = None, *,
                source: str = "cli") -> store.Correction:
        """Record a person's ``label`` for the event ``event_id`` (its text as classified,
        or ``text`` when given or when the store has none): the event's learned exemplar
        is relabelled, the text becomes (or its earlier correction's exemplar becomes) an
        exemplar of ``label``, and the next event with the same or a nearly identical text
        is decided as ``label``. Raises ValueError for an unknown label or no text."""
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}: one of {', '.join(LABELS)}")
        event_id = _storable(event_id) if event_id else None
        decided = store.decided_text(self.conn, event_id) if event_id else None
        was = decided[0] if decided else None
        if text is None:
            text = decided[1] if decided else None
        if not text or not text.strip():
            where = ("was never classified here" if decided is None
                     else "was classified before texts were kept")
            raise ValueError(f"event {event_id!r} {where}: give its text (--message)"
                             if event_id else "a correction needs a text")
        text = _storable(text)
        key = text_key(text)
        previous = store.correction_of(self.conn, key)
        vector = self.embedder.embed([text])[0]
        ts = now_ms()
        added = False
        with self._write() as conn:
            learned = store.learned_exemplar(conn, event_id) if event_id else None
            relabelled = learned[0] if learned else None
            if relabelled is not None:
                store.relabel_exemplar(conn, relabelled, label)
            if previous is not None and previous.exemplar_id is not None:
                exemplar_id = previous.exemplar_id
                store.relabel_exemplar(conn, exemplar_id, label)
            else:
                exemplar_id = store.add_exemplar(
                    conn, label=label, text=text, source=store.CORRECTION,
                    origin=f"correction:{event_id}" if event_id else "correction",
                    session_id=self.session_id, created_ms=ts,
                    vector=vector.astype(np.float16).tobytes(), text_key=key)
                added = True
            store.record_correction(conn, text_key=key, event_id=event_id, label=label,
                                    was=was, text=text, source=source, corrected_ms=ts,
                                    exemplar_id=exemplar_id, relabelled_id=relabelled)
            self._queue(conn, "exemplar", [i for i in (exemplar_id, relabelled) if i])
        if added:
            self._index_add([exemplar_id], vector.reshape(1, -1), [label])
        self._wake()
        self.refresh_corrections()
        found = store.correction_of(self.conn, key)
        assert found is not None
        return found

    def refresh_corrections(self) -> bool:
        """Take the corrections recorded since the last look (by any process): their
        labels, and their exemplars into the index. True when something changed."""
        version = store.corrections_version(self.conn)
        if version == self._corrections_seen:
            return False
        self._corrections_seen = version
        found = store.corrections(self.conn)
        self._corrected = {c.text_key: c.label for c in found}
        self._correction_exemplars = {c.exemplar_id for c in found if c.exemplar_id}
        ids = sorted({i for c in found for i in (c.exemplar_id, c.relabelled_id) if i})
        missing = []
        for exemplar_id, label, session, blob in store.exemplar_rows(self.conn, ids):
            if exemplar_id not in self._labels:
                missing.append((exemplar_id, np.frombuffer(blob, dtype=np.float16)))
            self._labels[exemplar_id] = (label, session)
        if missing:
            self.index.add_with_ids(
                np.stack([v for _, v in missing]).astype(np.float32),
                np.array([i for i, _ in missing], dtype=np.int64))
            self._unsaved += len(missing)
        return True

    def correction_for(self, text: str, neighbours: Sequence[Neighbour],
                       key: str | None = None) -> str | None:
        """The corrected label for ``text`` (whose ``text_key`` is ``key`` when given): its
        normalised text was corrected, or its nearest correction is nearly identical; None
        when no correction applies."""
        if not self._corrected:
            return None
        label = self._corrected.get(key or text_key(text))
        if label is not None:
            return label
        for n in neighbours:
            if n.similarity < NEAR_IDENTICAL:
                break
            if n.exemplar_id in self._correction_exemplars:
                return self._labels[n.exemplar_id][0]
        return None

    def correction_counts(self) -> dict[str, dict[str, int]]:
        return store.correction_counts(self.conn)

    # -- statistics -----------------------------------------------------------

    def stats(self, since_ms: int | None = None) -> dict[str, Any]:
        """Per-pattern counts, first/last seen, average confidence and its trend."""
        by_pattern: dict[str, dict[str, Any]] = {}
        for c in store.pattern_counts(self.conn):
            n = c.detections
            by_pattern[c.pattern] = {
                "detections": n, "average_confidence": c.confidence_sum / n if n else 0.0,
                "first_seen_ms": c.first_seen_ms, "last_seen_ms": c.last_seen_ms,
                "cross_session_matches": c.cross_session_matches,
                "confidence_trend": self.confidence_trend(c.pattern),
            }
        events, detected, average, cross = store.decision_totals(self.conn)
        exemplars = store.exemplars_by_source(self.conn)
        new = store.learned_since(self.conn, since_ms) if since_ms is not None else 0
        return {
            "events": events,
            "detections": detected,
            "average_confidence": average,
            "cross_session_matches": cross,
            "confidence_trend": self.confidence_trend(None),
            "exemplars": exemplars,
            "total_patterns": sum(exemplars.values()),
            "new_exemplars_since": new,
            "by_pattern": by_pattern,
        }

    def confidence_trend(self, pattern: str | None) -> float:
        """Mean confidence of the later half of detections minus that of the earlier half."""
        values = store.confidences(self.conn, pattern=pattern)
        if len(values) < 2:
            return 0.0
        half = len(values) // 2
        return float(np.mean(values[half:]) - np.mean(values[:half]))

