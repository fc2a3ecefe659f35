"""The pattern store's contract, on each backend: FAISS agrees with the record after any
restart; records are idempotent; learning is measurable, across restarts too.

``open_store`` opens the store at ``store_path`` on the backend under test: the local
SQLite file alone, or with Firestore (a real emulator, a project per test) as its
record. The tests are the same for both."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trinity.agents.witness.embedding import Embedder
from trinity.agents.witness.exemplars import Neighbour, vector_index
from trinity.agents.witness.knowledge import Knowledge
from trinity.agents.witness.model import Detection
from trinity.agents.witness.store import NEAR_COPY, PatternStore, Recorded, text_key
from trinity.agents.witness.text import event_text
from trinity.settings import Settings
from trinity.stores.patterns.firestore import FirestoreReplica

SEED = [
    ("panic: runtime error: invalid memory address or nil pointer dereference",
     "critical_error", "t1"),
    ("TypeError: Cannot read properties of undefined (reading 'map')", "critical_error", "t2"),
    ("error: Function is missing a type annotation  [no-untyped-def]",
     "constitution_violation", "t3"),
    ("Flaky test: test_upload_retries times out intermittently on CI", "flaky_test", "t4"),
    ("Feature request: add dark mode to the settings page", "feature_request", "t5"),
    ("R0801: Similar lines in 2 files", "duplication", "t6"),
    ("Server started on port 8080", "none", "t7"),
]




@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "trinity_patterns.db"


OpenStore = Callable[[], PatternStore]


@pytest.fixture(params=["sqlite", "firestore"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The Firestore project of this test (None: SQLite alone)."""
    if request.param == "sqlite":
        return None
    emulator = request.getfixturevalue("firestore_emulator")
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.host)
    return f"trinity-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def open_store(backend: str | None, store_path: Path, embedder: Embedder) -> OpenStore:
    def open_() -> PatternStore:
        return PatternStore(store_path, embedder,
                            FirestoreReplica(backend) if backend else None)
    return open_


@pytest.fixture
def store(open_store: OpenStore) -> Iterator[PatternStore]:
    s = open_store()
    s.seed(SEED)
    yield s
    s.close()


def _detection(embedder: Embedder, store: PatternStore, text: str, pattern: str | None,
               confidence: float = 0.9) -> Detection:
    vector = embedder.embed([text])[0]
    return Detection(pattern=pattern, label=pattern or "none", confidence=confidence,
                     probabilities={}, neighbours=tuple(store.search(vector, 5)),
                     vector=vector, notes=())


def test_index_agrees_with_sqlite_after_a_clean_restart(
    store_path: Path, embedder: Embedder, open_store: OpenStore
) -> None:
    first = open_store()
    assert first.seed(SEED) == len(SEED)
    assert first.seed(SEED) == 0  # seeding is once per store
    query = embedder.embed(["nil pointer dereference panic in handler"])[0]
    before = [(n.exemplar_id, round(n.similarity, 5)) for n in first.search(query, 3)]
    first.close()
    second = open_store()
    try:
        assert second.rebuilt is False
        assert second.index.ntotal == second.exemplar_count() == len(SEED)
        assert [(n.exemplar_id, round(n.similarity, 5)) for n in second.search(query, 3)] == before
        assert second.search(query, 1)[0].label == "critical_error"
    finally:
        second.close()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "stale"])
def test_a_stale_or_damaged_index_is_rebuilt_from_sqlite(
    store_path: Path, embedder: Embedder, open_store: OpenStore, damage: str
) -> None:
    first = open_store()
    first.seed(SEED)
    first.close()
    if damage == "missing":
        store_path.with_suffix(".faiss").unlink()
    elif damage == "corrupt":
        store_path.with_suffix(".faiss").write_bytes(b"not a faiss index")
    else:  # exemplars written by a process that died before saving its index
        conn = sqlite3.connect(store_path)
        vec = embedder.embed(["added while the index was not saved"])[0]
        conn.execute(
            "INSERT INTO exemplars(label, text, source, session_id, created_ms, vector)"
            " VALUES ('flaky_test', 'added while the index was not saved', 'detected', 'x', 0, ?)",
            (vec.astype(np.float16).tobytes(),))
        conn.commit()
        conn.close()
    second = open_store()
    try:
        assert second.rebuilt is True
        expected = len(SEED) + (1 if damage == "stale" else 0)
        assert second.index.ntotal == second.exemplar_count() == expected
        if damage == "stale":
            query = embedder.embed(["added while the index was not saved"])[0]
            assert second.search(query, 1)[0].similarity > 0.99
    finally:
        second.close()


def test_record_is_idempotent_by_event_id(store: PatternStore, embedder: Embedder) -> None:
    det = _detection(embedder, store, "Test test_sync fails intermittently", "flaky_test")
    before = store.exemplar_count()
    assert store.record(det, event_id="e1", text="Test test_sync fails intermittently")
    assert not store.record(det, event_id="e1", text="Test test_sync fails intermittently")
    stats = store.stats()
    assert stats["by_pattern"]["flaky_test"]["detections"] == 1
    assert stats["events"] == 1
    assert store.exemplar_count() == before + 1  # the detection became one exemplar
    stored = store.detection("e1")
    assert stored is not None and stored.pattern == "flaky_test"


FLAKY = "Test test_sync fails intermittently on CI run 1234"
FLAKY_AGAIN = "Test test_sync fails intermittently on CI run 5678"
FLAKY_OTHER = "test_upload_retry passes locally but times out about once in five runs"


def _hits(store: PatternStore) -> dict[str, tuple[int, int | None]]:
    """text -> (hits, last seen) of the learned exemplars."""
    return {text: (hits, seen) for text, hits, seen in store.conn.execute(
        "SELECT text, hits, last_seen_ms FROM exemplars WHERE source='detected'")}


def test_a_near_copy_strengthens_its_exemplar_instead_of_adding_one(
    store: PatternStore, embedder: Embedder
) -> None:
    """Memory follows what is new: the same event again (another run number) counts on
    the exemplar its first occurrence left, a different one is added."""
    a, b = embedder.embed([FLAKY, FLAKY_AGAIN])
    # the premise: not nearly the same vector (numbers weigh in a short text's vector),
    # the same text once numbers are masked
    assert float(a @ b) < NEAR_COPY and text_key(FLAKY) == text_key(FLAKY_AGAIN)
    before = store.exemplar_count()
    assert store.record(_detection(embedder, store, FLAKY, "flaky_test"), event_id="e1",
                        text=FLAKY)
    assert store.exemplar_count() == before + 1
    assert store.record(_detection(embedder, store, FLAKY_AGAIN, "flaky_test"), event_id="e2",
                        text=FLAKY_AGAIN)
    assert store.exemplar_count() == before + 1
    hits = _hits(store)
    assert hits[FLAKY][0] == 2 and hits[FLAKY][1] is not None
    store.record(_detection(embedder, store, FLAKY_OTHER, "flaky_test"), event_id="e3",
                 text=FLAKY_OTHER)
    assert store.exemplar_count() == before + 2
    stats = store.stats()  # every detection is counted either way
    assert stats["events"] == 3 and stats["by_pattern"]["flaky_test"]["detections"] == 3


def test_a_near_copy_of_another_pattern_is_learned_as_its_own(
    store: PatternStore, embedder: Embedder
) -> None:
    store.record(_detection(embedder, store, FLAKY, "flaky_test"), event_id="e1", text=FLAKY)
    before = store.exemplar_count()
    store.record(_detection(embedder, store, FLAKY_AGAIN, "critical_error"), event_id="e2",
                 text=FLAKY_AGAIN)
    assert store.exemplar_count() == before + 1
    assert _hits(store)[FLAKY][0] == 1


def test_near_copies_in_one_batch_are_one_exemplar(
    store: PatternStore, embedder: Embedder
) -> None:
    """Both were classified before either was learned: the batch itself is checked."""
    first = _detection(embedder, store, FLAKY, "flaky_test")
    again = _detection(embedder, store, FLAKY_AGAIN, "flaky_test")
    before = store.exemplar_count()
    assert store.record_many([
        Recorded(replace(first, text=FLAKY), "e1"), Recorded(replace(again, text=FLAKY_AGAIN),
                                                             "e2"),
        Recorded(replace(first, text=FLAKY), "e1")]) == [True, True, False]
    assert store.exemplar_count() == before + 1
    assert _hits(store) == {FLAKY: (2, _hits(store)[FLAKY][1])}
    assert store.stats()["events"] == 2


def test_a_full_store_strengthens_the_nearest_exemplar_of_the_pattern(
    store_path: Path, embedder: Embedder
) -> None:
    store = PatternStore(store_path, embedder, max_exemplars=len(SEED) + 1)
    try:
        store.seed(SEED)
        store.record(_detection(embedder, store, FLAKY, "flaky_test"), event_id="e1",
                     text=FLAKY)
        assert store.exemplar_count() == len(SEED) + 1
        det = _detection(embedder, store, FLAKY_OTHER, "flaky_test")
        nearest = next(n for n in det.neighbours if n.label == "flaky_test")
        assert nearest.similarity < NEAR_COPY  # not a near copy: only the cap stops it
        store.record(det, event_id="e2", text=FLAKY_OTHER)
        assert store.exemplar_count() == len(SEED) + 1
        hits = dict(store.conn.execute("SELECT id, hits FROM exemplars"))
        assert hits[nearest.exemplar_id] == 2
        assert store.stats()["by_pattern"]["flaky_test"]["detections"] == 2
        # nothing of the pattern among its neighbours: counted, not learned
        text = "the same 40-line block is copied into utils and helpers"
        lonely = _detection(embedder, store, text, "duplication")
        store.record(replace(lonely, neighbours=()), event_id="e3", text=text)
        assert store.exemplar_count() == len(SEED) + 1
        assert store.stats()["by_pattern"]["duplication"]["detections"] == 1
    finally:
        store.close()
    reopened = PatternStore(store_path, embedder)  # the counts are the record's
    try:
        assert reopened.exemplar_count() == len(SEED) + 1
        assert dict(reopened.conn.execute("SELECT id, hits FROM exemplars"))[
            nearest.exemplar_id] == 2
    finally:
        reopened.close()


def test_search_many_finds_what_search_finds(store: PatternStore, embedder: Embedder) -> None:
    queries = embedder.embed(["nil pointer dereference panic in handler",
                              "test times out now and then on CI", "please add dark mode"])
    together = store.search_many(queries, 4)
    assert together == [store.search(q, 4) for q in queries]
    assert [n[0].label for n in together] == ["critical_error", "flaky_test",
                                              "feature_request"]


def test_abstentions_are_counted_but_not_learned(
    store: PatternStore, embedder: Embedder
) -> None:
    det = _detection(embedder, store, "Listening on http://0.0.0.0:3000", None, 0.8)
    before = store.exemplar_count()
    assert store.record(det, event_id="n1", text="Listening on http://0.0.0.0:3000")
    stats = store.stats()
    assert stats["events"] == 1 and stats["detections"] == 0
    assert store.exemplar_count() == before


def test_matches_against_an_earlier_session_are_cross_session(
    store_path: Path, embedder: Embedder, open_store: OpenStore
) -> None:
    first = open_store()
    first.seed(SEED)
    text = "Test test_payment_refund is flaky and fails about 30% of runs"
    first.record(_detection(embedder, first, text, "flaky_test"), event_id="a", text=text)
    first.close()
    second = open_store()
    try:
        # like a's (its nearest) but not a near copy, so it is learned as its own
        again = "test_payment_refund flaked again: it failed in 35% of this week's nightly runs"
        det = _detection(embedder, second, again, "flaky_test")
        assert det.neighbours[0].session_id != second.session_id
        second.record(det, event_id="b", text=again)
        same_session = f"{again}, again"
        second.record(_detection(embedder, second, same_session, "flaky_test"), event_id="c",
                      text=same_session)  # its nearest exemplar is b's, from this session
        stats = second.stats()
        assert stats["cross_session_matches"] == 1
        assert stats["by_pattern"]["flaky_test"]["cross_session_matches"] == 1
    finally:
        second.close()


def test_a_changed_embedding_table_reembeds_the_stored_vectors(
    store_path: Path, embedder: Embedder, open_store: OpenStore
) -> None:
    first = open_store()
    first.seed(SEED)
    first.close()
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE meta SET value='another table' WHERE key='embedding'")
    conn.execute("UPDATE exemplars SET vector=?", (np.zeros(embedder.dim, np.float16).tobytes(),))
    conn.commit()
    conn.close()
    second = open_store()
    try:
        assert second.rebuilt is True
        query = embedder.embed([SEED[0][0]])[0]
        best = second.search(query, 1)[0]
        assert best.similarity > 0.99 and best.label == "critical_error"
    finally:
        second.close()


def test_learning_raises_confidence_and_survives_a_restart(short_dir: Path) -> None:
    """Feeding related events raises the confidence for that pattern on new events of the
    same kind, after a restart too, and those events match exemplars learned before it."""
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})
    # Requests without request wording. Before learning, "merge two workspaces" is not
    # yet recognised ("merge" mostly opens merged PRs, which are none); after, all are.
    stream = [f"Would love a way to {wish}" for wish in (
        "export reports as PDF", "pin favourite dashboards", "mute noisy alerts",
        "share a board read-only", "schedule a digest email", "rename a workspace",
        "archive old projects", "sort tasks by due date")]
    probes = [{"message": f"Would love a way to {wish}"} for wish in (
        "invite guests to a board", "filter the timeline by label",
        "star important comments", "merge two workspaces")]

    def probe_confidence(knowledge: Knowledge) -> float:
        """Mean p(feature_request) of the probes, classified without learning them."""
        seen = [knowledge.detector.classify(p) for p in probes]
        return float(np.mean([d.probabilities["feature_request"] for d in seen]))

    knowledge = Knowledge.open(settings)
    try:
        before = probe_confidence(knowledge)
        learned = [knowledge.observe({"message": m}, event_id=f"s-{i}")
                   for i, m in enumerate(stream)]
        assert all(o.pattern == "feature_request" for o in learned)
        # Each learned exemplar is the event's text, as classified.
        stored = dict(knowledge.store.conn.execute(
            "SELECT event_id, text FROM exemplars WHERE event_id LIKE 's-%'").fetchall())
        assert stored == {f"s-{i}": event_text({"message": m}).text
                          for i, m in enumerate(stream)}
    finally:
        knowledge.close()
    knowledge = Knowledge.open(settings)  # a restart: a new session
    try:
        after = probe_confidence(knowledge)
        for i, probe in enumerate(probes):
            knowledge.observe(probe, event_id=f"probe-{i}")
        stats = knowledge.store.stats()
    finally:
        knowledge.close()
    assert after > before, (before, after)
    assert stats["by_pattern"]["feature_request"]["detections"] == len(stream) + len(probes)
    assert stats["cross_session_matches"] >= 1
    assert stats["by_pattern"]["feature_request"]["cross_session_matches"] >= 1


def test_neighbour_type_is_the_detectors(store: PatternStore, embedder: Embedder) -> None:
    found = store.search(embedder.embed(["dark mode please"])[0], 3)
    assert found and all(isinstance(n, Neighbour) for n in found)
    assert found[0].label == "feature_request"


def test_an_index_of_another_kind_is_rebuilt_and_finds_the_same_neighbours(
    store_path: Path, embedder: Embedder
) -> None:
    """A store whose saved index is the exact float32 kind (written before the kind was
    chosen per faiss build, or on another machine) opens with the kind this machine's
    build searches fastest, holding the same stored values: the same neighbours and
    similarities as an exact float32 search."""
    import faiss

    first = PatternStore(store_path, embedder)
    first.seed(SEED)
    ids = np.array(sorted(first._labels), dtype=np.int64)
    vectors = np.stack([first.index.reconstruct(int(i)) for i in ids])
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.dim))
    flat.add_with_ids(vectors, ids)
    first.index = flat
    first.save_index()
    first.close()
    queries = embedder.embed(["nil pointer dereference panic in handler",
                              "test times out now and then on CI", "please add dark mode"])
    second = PatternStore(store_path, embedder)
    try:
        chosen = type(faiss.downcast_index(second.index.index))
        assert chosen is type(vector_index(embedder.dim))
        assert second.rebuilt is (chosen is not faiss.IndexFlatIP)
        for query in queries:
            sims, found = flat.search(query.reshape(1, -1), 4)
            assert [n.exemplar_id for n in second.search(query, 4)] == found[0].tolist()
            assert np.allclose([n.similarity for n in second.search(query, 4)], sims[0],
                               atol=1e-5)
    finally:
        second.close()
