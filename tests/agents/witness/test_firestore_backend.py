"""The Firestore pattern backend against a real emulator, beyond the shared contract
(``tests/agents/witness/test_patterns.py`` runs that on both backends):

* Firestore holds the record: queried through the client, it has every detection,
  counter and exemplar, and a store opened on another machine (an empty local file)
  takes them all and rebuilds its FAISS index from them;
* an outbox re-sent after a crash (Firestore committed, the local delete was lost)
  counts nothing twice.

The supervised runs on this backend (a Firestore outage mid-run, a kill-and-resume) are
tests/system/test_firestore_backend.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from tests.firestore_emulator import FirestoreEmulator, trinity_collections
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

    remote = trinity_collections(project_id)
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
        before = trinity_collections(project_id)["patterns"]
        # A crash after Firestore's commit and before the outbox delete: sent again.
        with store.conn:
            outbox_add(store.conn, "detection", [e[0] for e in EVENTS])
        assert pending(store.conn) == len(EVENTS)
        store.replica.wake()  # type: ignore[union-attr]
        assert wait_sent(store.conn, 30)
        assert trinity_collections(project_id)["patterns"] == before
        assert before["flaky_test"]["detections"] == 2
    finally:
        store.close()
