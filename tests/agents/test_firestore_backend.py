"""The Firestore pattern backend against a real emulator, beyond the shared contract
(``tests/agents/test_patterns.py`` runs that on both backends):

* Firestore holds the record: queried through the client, it has every detection,
  counter and exemplar, and a store opened on another machine (an empty local file)
  takes them all and rebuilds its FAISS index from them;
* an outbox re-sent after a crash (Firestore committed, the local delete was lost)
  counts nothing twice;
* a Firestore that stops answering mid-run: WITNESS's heartbeat reports it, the
  controller raises a ``database_error`` alert, events go on being classified, and
  once Firestore is back everything detected meanwhile is in it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from tests.conftest import Project, wait_for
from tests.firestore_emulator import FirestoreEmulator, need_emulator
from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import PatternStore
from trinity.stores.patterns.firestore import (
    FirestoreReplica,
    detection_doc_id,
    outbox_add,
    pending,
    wait_sent,
)
from trinity.stores.run_logs import read_alerts

SEED = [
    ("panic: runtime error: invalid memory address or nil pointer dereference",
     "critical_error", "t1"),
    ("error: Function is missing a type annotation  [no-untyped-def]",
     "constitution_violation", "t3"),
    ("Flaky test: test_upload_retries times out intermittently on CI", "flaky_test", "t4"),
    ("Server started on port 8080", "none", "t7"),
]
EVENTS = [
    ("e1", "Test test_sync fails intermittently", "flaky_test", 0.81),
    ("e2", "panic: assignment to entry in nil map", "critical_error", 0.93),
    ("e3/with/slashes", "Test test_upload is flaky on CI", "flaky_test", 0.77),
    ("e4", "Listening on http://0.0.0.0:3000", None, 0.9),
]


@pytest.fixture
def project_id(firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    return f"trinity-{uuid.uuid4().hex[:12]}"


def _record(store: PatternStore, embedder: Embedder) -> None:
    for event_id, text, pattern, confidence in EVENTS:
        vector = embedder.embed([text])[0]
        detection = Detection(pattern=pattern, label=pattern or "none", confidence=confidence,
                              probabilities={}, neighbours=tuple(store.search(vector, 5)),
                              vector=vector, notes=())
        store.record(detection, event_id=event_id, text=text, run_id="run-1")


def _firestore(project_id: str) -> dict[str, dict[str, dict[str, Any]]]:
    client = firestore.Client(project=project_id)
    try:
        return {name: {d.id: d.to_dict() for d in client.collection(f"trinity_{name}").stream()}
                for name in ("sessions", "exemplars", "detections", "patterns")}
    finally:
        client.close()


def test_firestore_holds_the_record_and_a_new_machine_takes_it(
    tmp_path: Path, embedder: Embedder, project_id: str
) -> None:
    store = PatternStore(tmp_path / "a" / "trinity_patterns.db", embedder,
                         FirestoreReplica(project_id))
    store.seed(SEED)
    _record(store, embedder)
    assert wait_sent(store.conn, 30)
    stats = store.stats()
    query = embedder.embed(["Test test_upload is flaky on CI"])[0]
    nearest = [(n.exemplar_id, n.label) for n in store.search(query, 3)]
    store.close()

    remote = _firestore(project_id)
    assert len(remote["detections"]) == stats["events"] == len(EVENTS)
    assert remote["detections"][detection_doc_id("e3/with/slashes")]["event_id"] == \
        "e3/with/slashes"
    assert len(remote["exemplars"]) == sum(stats["exemplars"].values()) == len(SEED) + 3
    for pattern, local in stats["by_pattern"].items():
        doc = remote["patterns"][pattern]
        assert doc["detections"] == local["detections"]
        assert doc["confidence_sum"] / doc["detections"] == pytest.approx(
            local["average_confidence"])
        assert (doc["first_seen_ms"], doc["last_seen_ms"]) == (local["first_seen_ms"],
                                                               local["last_seen_ms"])
    # The run's detections, by a query.
    client = firestore.Client(project=project_id)
    try:
        run = client.collection("trinity_detections").where(
            filter=FieldFilter("run_id", "==", "run-1")).stream()
        assert sorted(d.to_dict()["event_id"] for d in run) == sorted(e[0] for e in EVENTS)
    finally:
        client.close()

    # Another machine: an empty local file, the same Firestore project.
    elsewhere = PatternStore(tmp_path / "b" / "trinity_patterns.db", embedder,
                             FirestoreReplica(project_id))
    try:
        assert elsewhere.rebuilt is True
        assert elsewhere.index.ntotal == elsewhere.exemplar_count() == len(SEED) + 3
        again = elsewhere.stats()
        for key in ("events", "detections", "average_confidence", "exemplars"):
            assert again[key] == stats[key], key
        assert {p: v["detections"] for p, v in again["by_pattern"].items()} == \
            {p: v["detections"] for p, v in stats["by_pattern"].items()}
        assert [(n.exemplar_id, n.label) for n in elsewhere.search(query, 3)] == nearest
        assert elsewhere.seed(SEED) == 0  # seeded once, wherever it was
        stored = elsewhere.detection("e2")
        assert stored is not None and stored.pattern == "critical_error"
    finally:
        elsewhere.close()


def test_malformed_firestore_documents_are_skipped_with_a_reason(
    tmp_path: Path, embedder: Embedder, project_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Documents written by something else (a missing key, a map where text belongs) do
    not stop the store from opening; the well-formed ones are taken."""
    first = PatternStore(tmp_path / "a" / "trinity_patterns.db", embedder,
                         FirestoreReplica(project_id))
    _record(first, embedder)
    assert wait_sent(first.conn, 30)
    first.close()
    client = firestore.Client(project=project_id)
    try:
        client.collection("trinity_patterns").document("bogus").set({"detections": 3})
        client.collection("trinity_detections").document("odd").set(
            {"event_id": {"not": "text"}, "run_id": "run-1", "label": "none"})
        client.collection("trinity_sessions").document("s").set({"started_ms": 1})
    finally:
        client.close()
    with caplog.at_level("WARNING", logger="trinity.stores.patterns.firestore"):
        second = PatternStore(tmp_path / "b" / "trinity_patterns.db", embedder,
                              FirestoreReplica(project_id))
    try:
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert sorted(skipped) == sorted([
            "Firestore sessions/s skipped: field session_id missing or not a number, text "
            "or bytes",
            "Firestore detections/odd skipped: field event_id missing or not a number, text "
            "or bytes",
            "Firestore patterns/bogus skipped: field pattern missing or not a number, text "
            "or bytes"])
        assert second.stats()["events"] == len(EVENTS)
    finally:
        second.close()


def test_a_resent_outbox_counts_nothing_twice(
    tmp_path: Path, embedder: Embedder, project_id: str
) -> None:
    replica = FirestoreReplica(project_id)
    store = PatternStore(tmp_path / "trinity_patterns.db", embedder, replica)
    try:
        _record(store, embedder)
        assert wait_sent(store.conn, 30)
        before = _firestore(project_id)["patterns"]
        # A crash after Firestore's commit and before the outbox delete: sent again.
        with store.conn:
            outbox_add(store.conn, "detection", [e[0] for e in EVENTS])
        assert pending(store.conn) == len(EVENTS)
        store.replica.wake()  # type: ignore[union-attr]
        assert wait_sent(store.conn, 30)
        assert _firestore(project_id)["patterns"] == before
        assert before["flaky_test"]["detections"] == 2
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_firestore_outage_mid_run_is_alerted_and_nothing_is_lost(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervised run on the Firestore backend; the emulator is frozen (SIGSTOP) for a
    while, then thawed."""
    need_emulator()
    own = FirestoreEmulator().start()  # frozen below: not the session's shared one
    project_id = f"trinity-{uuid.uuid4().hex[:12]}"
    project.env.update({"TRINITY_PATTERN_BACKEND": "firestore",
                        "GOOGLE_CLOUD_PROJECT": project_id,
                        "FIRESTORE_EMULATOR_HOST": own.host})
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own.host)
    patterns_db = project.root / "trinity_patterns.db"
    try:
        result = project.trinity("run", "--detach", "--duration", "24", "--time-scale",
                                 "600", "--event-interval", "5")
        assert result.returncode == 0, result.stdout + result.stderr

        def detections() -> int:
            try:
                conn = sqlite3.connect(f"file:{patterns_db}?mode=ro", uri=True, timeout=10)
                try:
                    return int(conn.execute("SELECT count(*) FROM detections").fetchone()[0])
                finally:
                    conn.close()
            except sqlite3.Error:
                return 0

        wait_for(lambda: detections() >= 2, 90, "WITNESS to record detections")
        assert own.pid is not None
        os.kill(own.pid, signal.SIGSTOP)
        try:
            frozen_at = detections()

            def alerted() -> list[dict[str, Any]]:
                return [a for a in read_alerts(project.alerts_log)
                        if a.get("kind") == "database_error"
                        and a.get("details", {}).get("database") == "firestore"]

            wait_for(alerted, 60, "a database_error alert naming Firestore")
            wait_for(lambda: detections() >= frozen_at + 3, 60,
                     "WITNESS to go on classifying while Firestore is away")
            with sqlite3.connect(patterns_db, timeout=10) as conn:
                assert pending(conn) > 0  # waiting in the outbox, not lost
        finally:
            os.kill(own.pid, signal.SIGCONT)
        with sqlite3.connect(patterns_db, timeout=10) as conn:
            assert wait_sent(conn, 90), "the outbox was not sent after Firestore came back"
        project.trinity("stop")
        with sqlite3.connect(patterns_db, timeout=10) as conn:
            local = {e for (e,) in conn.execute("SELECT event_id FROM detections")}
            counts = dict(conn.execute("SELECT pattern, detections FROM patterns").fetchall())
        remote = _firestore(project_id)
        assert {d["event_id"] for d in remote["detections"].values()} == local
        assert {p: d["detections"] for p, d in remote["patterns"].items()} == counts
        assert [a for a in read_alerts(project.alerts_log)
                if a.get("kind") == "agent_crashed"] == []
    finally:
        project.trinity("stop")
        own.stop()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_compressed_run_with_kill_and_resume_ends_with_every_pattern_in_firestore(
    project: Project, firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 simulated hours (an event every 4 h) on the Firestore backend, kill -9 of
    everything at hour 12 and --resume: persistence is validated against Firestore, and
    at the end Firestore holds each of the run's detections and the pattern counters."""
    project_id = f"trinity-{uuid.uuid4().hex[:12]}"
    project.env.update({"TRINITY_PATTERN_BACKEND": "firestore",
                        "GOOGLE_CLOUD_PROJECT": project_id,
                        "FIRESTORE_EMULATOR_HOST": firestore_emulator.host})
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    try:
        # 6 events: the run is bound by the model agents (~3 s of calls per event) or by
        # its clock (30 s at 2880 for 24 h), whichever is slower.
        result = project.trinity("run", "--duration", "24", "--time-scale", "5760",
                                 "--event-interval", "240", "--restart-at", "12",
                                 timeout=360)
        out = result.stdout + result.stderr
        assert "persistence: OK" in out, out
        check = project.trinity("validate-persistence", "--json")
        report = json.loads(check.stdout)
        assert check.returncode == 0 and report["ok"], report["problems"]
        in_firestore = report["state"]["firestore"]
    finally:
        project.trinity("stop")
    patterns_db = project.root / "trinity_patterns.db"
    with sqlite3.connect(patterns_db) as conn:
        run_id = conn.execute("SELECT run_id FROM detections WHERE run_id IS NOT NULL"
                              " LIMIT 1").fetchone()[0]
        local = dict(conn.execute("SELECT event_id, pattern FROM detections WHERE run_id=?",
                                  (run_id,)).fetchall())
        counters = dict(conn.execute("SELECT pattern, detections FROM patterns").fetchall())
    assert len(local) == 6  # one per event (no noise events)
    remote = _firestore(project_id)
    assert {d["event_id"]: d["pattern"] for d in remote["detections"].values()
            if d["run_id"] == run_id} == local
    assert in_firestore["run_detections"] == len(local)
    assert {p: d["detections"] for p, d in remote["patterns"].items()} == counters
    assert sum(counters.values()) == sum(1 for p in local.values() if p)
