"""Firestore as the pattern store's record (``TRINITY_PATTERN_BACKEND=firestore``).

WITNESS keeps working on its local SQLite file (FAISS ids, dedupe by event id, the
figures the controller and the report read). With this backend every write to that file
also puts a row in its ``outbox`` table, in the same SQLite transaction, and a
replicator thread sends the outbox to Firestore and deletes what Firestore acknowledged:

* sessions and exemplars: batched ``set`` keyed by their ids (re-sending is harmless);
* detections: one Firestore transaction per chunk reads the chunk's detection documents
  and, for those not there yet, creates them and adds to their pattern's counters with
  ``Increment`` (first/last seen by read-modify-write in the same transaction: the
  emulator has no Minimum/Maximum transforms). A chunk re-sent after a crash between
  Firestore's commit and the outbox delete therefore counts nothing twice.

On open, :meth:`FirestoreReplica.sync` sends what the outbox still holds, then copies
into the local file whatever Firestore has that it lacks (a new machine, a lost file)
and takes Firestore's pattern counters; the FAISS index is then built from that union,
i.e. from Firestore. When Firestore cannot be reached, nothing waits for it: detections
stay in the outbox, WITNESS reports the failure in its heartbeat (the controller raises
a ``database_error`` alert), and the thread retries with backoff until it has caught up.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from trinity.db import immediate
from trinity.errors import ConfigError, JournalError

log = logging.getLogger(__name__)

# Rows sent per round; a detection chunk is one transaction (Firestore: <= 500 writes).
CHUNK = 200
CALL_TIMEOUT_S = 5.0
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)

_EXEMPLAR_COLUMNS = ("id", "label", "text", "source", "origin", "event_id", "confidence",
                     "session_id", "created_ms", "vector")
_DETECTION_COLUMNS = ("event_id", "run_id", "session_id", "pattern", "label", "confidence",
                      "detected_ms", "nearest_id", "nearest_similarity", "cross_session",
                      "latency_ms")
_PATTERN_COLUMNS = ("pattern", "detections", "confidence_sum", "first_seen_ms",
                    "last_seen_ms", "cross_session_matches")
# What pull takes, in this order: (table = collection, how, columns; the first is the key).
# Firestore's pattern counters replace the local ones: they include every session's.
_PULLED = (("sessions", "INSERT OR IGNORE", ("session_id", "started_ms")),
           ("exemplars", "INSERT OR IGNORE", _EXEMPLAR_COLUMNS),
           ("detections", "INSERT OR IGNORE", _DETECTION_COLUMNS),
           ("patterns", "INSERT OR REPLACE", _PATTERN_COLUMNS))
_SQL_SCALARS = (int, float, str, bytes, type(None))


def check_credentials(emulator_host: str) -> None:
    """ConfigError unless the client could authenticate: an emulator needs nothing, real
    Firestore needs Google credentials (without them WITNESS could not start at all)."""
    if emulator_host:
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as exc:
        raise ConfigError(
            f"TRINITY_PATTERN_BACKEND=firestore: no Google credentials ({exc}); set "
            "FIRESTORE_EMULATOR_HOST=host:port to use an emulator") from None


def outbox_add(conn: sqlite3.Connection, kind: str, keys: Iterable[str]) -> None:
    """Queue records for Firestore, inside the caller's SQLite transaction."""
    conn.executemany("INSERT INTO outbox(kind, key) VALUES (?, ?)",
                     [(kind, str(k)) for k in keys])


def detection_doc_id(event_id: str) -> str:
    """Event ids may hold ``/`` or be long; a document id may not."""
    return hashlib.sha1(event_id.encode("utf-8", "surrogatepass")).hexdigest()


def retried_errors() -> tuple[type[Exception], ...]:
    """What a call retries (with backoff, within its timeout)."""
    from google.api_core import exceptions as gexc

    return (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError,
            gexc.ResourceExhausted, gexc.Aborted, gexc.Unknown)


def transient_errors() -> tuple[type[Exception], ...]:
    """What leaves records in the outbox for a later round: the retried errors, and a
    retry that ran out of time."""
    from google.api_core import exceptions as gexc

    return (*retried_errors(), gexc.RetryError)


class FirestoreReplica:
    """The pattern store's copy in Firestore, and the thread that keeps it current."""

    def __init__(self, project: str, prefix: str = "trinity") -> None:
        from google.api_core.retry import Retry, if_exception_type
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import firestore

        try:
            self.client = firestore.Client(project=project)
        except DefaultCredentialsError as exc:
            raise ConfigError(f"Firestore project {project}: no credentials ({exc}); set "
                              "FIRESTORE_EMULATOR_HOST for an emulator") from None
        self.project = project
        self.prefix = prefix
        self._retry = Retry(initial=0.1, maximum=1.0, multiplier=2.0, timeout=CALL_TIMEOUT_S,
                            predicate=if_exception_type(*retried_errors()))
        self.error: str | None = None  # why the last round failed, while it keeps failing
        self.pushed = 0
        self._busy_since: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def collection(self, name: str) -> Any:
        return self.client.collection(f"{self.prefix}_{name}")

    # -- sending ---------------------------------------------------------------

    def push(self, conn: sqlite3.Connection) -> int:
        """Send the outbox until it is empty; returns how many records were sent.
        Raises the client's error when Firestore fails (what was not sent stays queued)."""
        sent = 0
        while rows := conn.execute(
                "SELECT seq, kind, key FROM outbox ORDER BY seq LIMIT ?", (CHUNK,)).fetchall():
            by_kind: dict[str, list[str]] = {}
            for _, kind, key in rows:
                by_kind.setdefault(kind, []).append(key)
            self._send_sessions(conn, by_kind.pop("session", []))
            self._send_exemplars(conn, by_kind.pop("exemplar", []))
            self._send_detections(conn, by_kind.pop("detection", []))
            if by_kind:
                log.error("outbox: unknown kinds %s dropped", sorted(by_kind))
            with immediate(conn) as tx:
                tx.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
            sent += len(rows)
        self.pushed += sent
        return sent

    def _commit_sets(self, name: str, docs: list[tuple[str, dict[str, Any]]]) -> None:
        for lo in range(0, len(docs), 400):
            batch = self.client.batch()
            for doc_id, data in docs[lo:lo + 400]:
                batch.set(self.collection(name).document(doc_id), data)
            batch.commit(retry=self._retry, timeout=CALL_TIMEOUT_S)

    def _send_sessions(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        if keys:
            rows = _select(conn, "sessions", ("session_id", "started_ms"), "session_id", keys)
            self._commit_sets("sessions", [(r["session_id"], r) for r in rows])

    def _send_exemplars(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        if keys:
            rows = _select(conn, "exemplars", _EXEMPLAR_COLUMNS, "id", [int(k) for k in keys])
            self._commit_sets("exemplars", [(str(r["id"]), r) for r in rows])

    def _send_detections(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        if not keys:
            return
        from google.cloud import firestore

        rows = _select(conn, "detections", _DETECTION_COLUMNS, "event_id", keys)
        detections = self.collection("detections")
        patterns = self.collection("patterns")

        @firestore.transactional
        def apply(tx: Any) -> None:
            refs = [detections.document(detection_doc_id(r["event_id"])) for r in rows]
            pattern_refs = {p: patterns.document(p) for p in {r["pattern"] for r in rows} if p}
            found = {snap.reference.path: snap for snap in self.client.get_all(
                [*refs, *pattern_refs.values()], transaction=tx, retry=self._retry,
                timeout=CALL_TIMEOUT_S)}
            totals: dict[str, dict[str, Any]] = {}
            for ref, row in zip(refs, rows, strict=True):
                if found[ref.path].exists:
                    continue  # sent before: counted once already
                tx.create(ref, row)
                if row["pattern"]:
                    t = totals.setdefault(row["pattern"], {"n": 0, "conf": 0.0, "cross": 0,
                                                           "first": None, "last": None})
                    t["n"] += 1
                    t["conf"] += float(row["confidence"])
                    t["cross"] += int(row["cross_session"])
                    ts = int(row["detected_ms"])
                    t["first"] = ts if t["first"] is None else min(t["first"], ts)
                    t["last"] = ts if t["last"] is None else max(t["last"], ts)
            for pattern, t in totals.items():
                before = found[pattern_refs[pattern].path].to_dict() or {}
                first = before.get("first_seen_ms")
                last = before.get("last_seen_ms")
                tx.set(pattern_refs[pattern], {
                    "pattern": pattern,
                    "detections": firestore.Increment(t["n"]),
                    "confidence_sum": firestore.Increment(t["conf"]),
                    "cross_session_matches": firestore.Increment(t["cross"]),
                    "first_seen_ms": t["first"] if first is None else min(first, t["first"]),
                    "last_seen_ms": t["last"] if last is None else max(last, t["last"]),
                }, merge=True)

        apply(self.client.transaction(max_attempts=3))

    # -- reading -----------------------------------------------------------------

    def _stream(self, query: Any) -> list[Any]:
        return list(query.stream(retry=self._retry, timeout=CALL_TIMEOUT_S))

    def run_detections(self, run_id: str) -> dict[str, str | None]:
        """A run's detections in Firestore: event id -> pattern (None: abstained)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        return {d.get("event_id"): d.get("pattern") for d in self._stream(
            self.collection("detections").where(filter=FieldFilter("run_id", "==", run_id)))}

    def pattern_counters(self) -> dict[str, int]:
        return {d.id: int(d.get("detections")) for d in self._stream(
            self.collection("patterns"))}

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    # -- receiving -------------------------------------------------------------

    def pull(self, conn: sqlite3.Connection) -> dict[str, int]:
        """Copy into the local file what Firestore has and it lacks, and take Firestore's
        pattern counters (call with an empty outbox). Returns how many rows were new, and
        how many documents were skipped as malformed (logged with the reason)."""
        new = {"sessions": 0, "exemplars": 0, "detections": 0, "patterns": 0, "skipped": 0}
        docs = {name: self._stream(self.collection(name)) for name, _, _ in _PULLED}
        with immediate(conn) as tx:
            for name, verb, columns in _PULLED:
                sql = (f"{verb} INTO {name}({', '.join(columns)})"
                       f" VALUES ({', '.join('?' * len(columns))})")
                for doc in docs[name]:
                    row = doc.to_dict() or {}
                    values = [row.get(c) for c in columns]
                    bad = [c for c, v in zip(columns, values, strict=True)
                           if not isinstance(v, _SQL_SCALARS)]
                    if bad or values[0] is None:
                        log.warning("Firestore %s/%s skipped: field %s missing or not a "
                                    "number, text or bytes", name, doc.id, (bad or columns)[0])
                        new["skipped"] += 1
                        continue
                    added = tx.execute(sql, values).rowcount
                    if name == "exemplars" and not added:
                        _check_same_exemplar(tx, row, self.project)
                    new[name] += added
        return new

    def sync(self, conn: sqlite3.Connection) -> bool:
        """Send the outbox, then take what Firestore has; False (and ``error`` set) when
        Firestore could not be reached: the store then starts from its local file."""
        try:
            # A bounded read first: some calls of a transaction retry for minutes.
            self.collection("sessions").limit(1).get(retry=self._retry,
                                                     timeout=CALL_TIMEOUT_S)
            self.push(conn)
            pulled = self.pull(conn)
        except transient_errors() as exc:
            self._failed(exc)
            return False
        self.error = None
        if any(pulled.values()):
            log.info("took from Firestore %s: %s", self.project, pulled)
        return True

    # -- the replicator thread ---------------------------------------------------

    def start(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._thread = threading.Thread(target=self._run, args=(connect,),
                                        name="firestore-replicator", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Stop the thread after one last round (what is not sent stays in the outbox)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("Firestore replicator still busy after %.0f s: %s", timeout_s,
                            "the outbox is sent at the next start")

    def problem(self) -> str | None:
        """Why Firestore is behind: the last round's error, or a round that has had no
        answer for longer than a call may take (some client calls retry for minutes)."""
        busy = self._busy_since
        if self.error is None and busy is not None \
                and time.monotonic() - busy > 2 * CALL_TIMEOUT_S:
            return (f"firestore (project {self.project}): no answer for "
                    f"{time.monotonic() - busy:.0f} s")
        return self.error

    def _run(self, connect: Callable[[], sqlite3.Connection]) -> None:
        conn = connect()
        failures = 0
        try:
            while True:
                stopping = self._stop.is_set()
                self._busy_since = time.monotonic()
                try:
                    if self.push(conn) and self.error is not None:
                        log.info("Firestore %s reachable again: outbox sent", self.project)
                    self.error = None
                    failures = 0
                except transient_errors() as exc:
                    self._failed(exc)
                    failures += 1
                except (sqlite3.Error, JournalError) as exc:
                    log.error("outbox: %s", exc)
                    failures += 1
                finally:
                    self._busy_since = None
                if stopping:
                    return
                wait = BACKOFF_S[min(failures, len(BACKOFF_S)) - 1] if failures else 1.0
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            conn.close()

    def _failed(self, exc: BaseException) -> None:
        why = f"firestore (project {self.project}): {type(exc).__name__}: {exc}"[:500]
        if why != self.error:
            log.error("%s; detections wait in the outbox", why)
        self.error = why


def _select(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], key: str,
            keys: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for lo in range(0, len(keys), 500):
        part = keys[lo:lo + 500]
        out += [dict(zip(columns, row, strict=True)) for row in conn.execute(
            f"SELECT {', '.join(columns)} FROM {table} WHERE {key} IN"
            f" ({', '.join('?' * len(part))})", part)]
    return out


def _check_same_exemplar(conn: sqlite3.Connection, row: dict[str, Any], project: str) -> None:
    mine = conn.execute("SELECT session_id, text FROM exemplars WHERE id=?",
                        (row["id"],)).fetchone()
    if mine is not None and tuple(mine) != (row["session_id"], row["text"]):
        raise JournalError(
            f"exemplar {row['id']} differs between the local pattern store and Firestore "
            f"project {project}: each Firestore project holds one store (start from an "
            "empty local file to take Firestore's, or use another GOOGLE_CLOUD_PROJECT)")


def pending(conn: sqlite3.Connection, up_to: int | None = None) -> int:
    """Records not yet acknowledged by Firestore, all or those queued up to outbox row
    ``up_to`` (0 when the table does not exist: nothing was ever queued)."""
    sql = "SELECT count(*) FROM outbox"
    args: tuple[int, ...] = ()
    if up_to is not None:
        sql, args = sql + " WHERE seq <= ?", (up_to,)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def last_queued(conn: sqlite3.Connection) -> int:
    """The newest outbox row (0: none)."""
    try:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def wait_sent(conn: sqlite3.Connection, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pending(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
