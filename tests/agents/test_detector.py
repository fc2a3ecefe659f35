"""WITNESS's detector: the test plan's events, abstention, hostile input and learning.

The model is trained once per module on the full dev set (~3 s) with the dev set as
exemplars, as a fresh install's store is seeded. None of the events below is in the dev set.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.agents.detector import (
    LABELS,
    NONE,
    PATTERNS,
    Detection,
    Detector,
    EventText,
    InMemoryExemplars,
    TrainedModel,
    event_text,
    load_devset,
    normalise,
    train,
)
from trinity.agents.embedding import StaticEmbedder
from trinity.agents.evaluate import PLAN_EVENTS, SANITY_NEGATIVES
from trinity.errors import InvalidPayload


@pytest.fixture(scope="module")
def model(embedder: StaticEmbedder) -> TrainedModel:
    return train([(event, label) for event, label, _ in load_devset()], embedder)


def seeded(embedder: StaticEmbedder) -> InMemoryExemplars:
    data = load_devset()
    exemplars = InMemoryExemplars(embedder.dim)
    vectors = embedder.embed([event_text(event).text for event, _, _ in data])
    exemplars.add(vectors, [label for _, label, _ in data], "seed")
    return exemplars


@pytest.fixture
def detector(embedder: StaticEmbedder, model: TrainedModel) -> Detector:
    return Detector(embedder, model, seeded(embedder))


def check_invariants(det: Detection) -> None:
    assert set(det.probabilities) == set(LABELS)
    assert math.isclose(sum(det.probabilities.values()), 1.0, abs_tol=1e-6)
    assert 0.0 <= det.confidence <= 1.0
    assert det.label == max(det.probabilities, key=lambda k: det.probabilities[k])
    if det.pattern is None:
        assert det.confidence == pytest.approx(det.probabilities[NONE])
    else:
        assert det.pattern in PATTERNS
        assert det.confidence == pytest.approx(det.probabilities[det.pattern])


# -- the test plan ----------------------------------------------------------------


def test_plan_events_are_not_in_the_dev_set() -> None:
    messages = {event["message"] for event, _, _ in load_devset()}
    assert not messages & {event["message"] for event, _, _ in PLAN_EVENTS}


@pytest.mark.parametrize(
    ("event", "expected", "minimum"), PLAN_EVENTS, ids=[p[1] for p in PLAN_EVENTS]
)
def test_plan_event_detected_with_confidence(
    detector: Detector, event: dict[str, Any], expected: str, minimum: float
) -> None:
    det = detector.classify(event)
    check_invariants(det)
    assert det.pattern == expected
    assert det.confidence > minimum


@pytest.mark.parametrize("message", SANITY_NEGATIVES)
def test_ordinary_events_abstain(detector: Detector, message: str) -> None:
    det = detector.classify({"message": message})
    check_invariants(det)
    assert det.pattern is None
    assert det.label == NONE


def test_fields_that_name_a_class_are_not_evidence(detector: Detector) -> None:
    """``user_intent``/``pattern`` exist only in synthetic producers; the text decides."""
    plain = detector.classify({"message": "Server started on port 8080"})
    loaded = detector.classify(
        {
            "message": "Server started on port 8080",
            "user_intent": "feature_request",
            "pattern": "duplication",
            "violation_type": "strict_typing",
        }
    )
    assert loaded.pattern is None
    np.testing.assert_allclose(
        list(plain.probabilities.values()), list(loaded.probabilities.values())
    )


def test_classify_is_deterministic(embedder: StaticEmbedder, model: TrainedModel) -> None:
    event = PLAN_EVENTS[4][0]
    first = Detector(embedder, model, seeded(embedder)).classify(event)
    again = Detector(embedder, model, seeded(embedder))
    for _ in range(3):
        det = again.classify(event)
        assert det.probabilities == first.probabilities
        assert det.confidence == first.confidence
        assert det.neighbours == first.neighbours
        np.testing.assert_array_equal(det.vector, first.vector)


def test_model_pickles(embedder: StaticEmbedder, model: TrainedModel, detector: Detector) -> None:
    restored = pickle.loads(pickle.dumps(model))
    event = PLAN_EVENTS[0][0]
    other = Detector(embedder, restored, seeded(embedder))
    assert other.classify(event).probabilities == detector.classify(event).probabilities


def test_model_is_tied_to_its_embedding_table(
    embedder: StaticEmbedder, model: TrainedModel
) -> None:
    model_other = pickle.loads(pickle.dumps(model))
    model_other.embedder_fingerprint = "0" * 64
    with pytest.raises(ValueError):
        Detector(embedder, model_other, seeded(embedder))


def test_train_rejects_unknown_labels(embedder: StaticEmbedder) -> None:
    with pytest.raises(ValueError):
        train([({"message": "x"}, "bug")], embedder)


def test_works_without_exemplars(embedder: StaticEmbedder, model: TrainedModel) -> None:
    det = Detector(embedder, model, InMemoryExemplars(embedder.dim)).classify(PLAN_EVENTS[3][0])
    check_invariants(det)
    assert det.neighbours == ()
    assert det.pattern == "duplication"


def test_neighbours_best_first(detector: Detector) -> None:
    det = detector.classify(PLAN_EVENTS[0][0])
    sims = [n.similarity for n in det.neighbours]
    assert len(sims) == detector.model.k
    assert sims == sorted(sims, reverse=True)


# -- learning -----------------------------------------------------------------------

# Variants of one flaky-test report, phrased unlike anything in the dev set.
FLAKY_STREAM = [
    f"{name} in {module} failed on attempt {attempt} and passed when re-run"
    for name, module, attempt in [
        ("test_upload_resume", "tests/test_storage.py", 1),
        ("test_cache_eviction", "tests/test_cache.py", 2),
        ("test_session_expiry", "tests/test_auth.py", 1),
        ("test_queue_drain", "tests/test_worker.py", 3),
        ("test_retry_backoff", "tests/test_http.py", 1),
        ("test_websocket_reconnect", "tests/test_ws.py", 2),
        ("test_order_sync", "tests/test_orders.py", 1),
        ("test_metrics_flush", "tests/test_metrics.py", 2),
        ("test_lock_timeout", "tests/test_db.py", 1),
        ("test_batch_import", "tests/test_import.py", 1),
        ("test_email_digest", "tests/test_mail.py", 2),
        ("test_token_refresh", "tests/test_auth.py", 3),
        ("test_index_rebuild", "tests/test_search.py", 1),
        ("test_thumbnail_render", "tests/test_media.py", 2),
        ("test_rate_limit", "tests/test_api.py", 1),
        ("test_cron_trigger", "tests/test_sched.py", 1),
        ("test_csv_export", "tests/test_export.py", 2),
        ("test_sse_stream", "tests/test_events.py", 1),
        ("test_pool_resize", "tests/test_pool.py", 2),
        ("test_ledger_close", "tests/test_ledger.py", 1),
    ]
]


def test_learning_raises_confidence_for_a_recurring_pattern(
    embedder: StaticEmbedder, model: TrainedModel
) -> None:
    exemplars = seeded(embedder)
    detector = Detector(embedder, model, exemplars)
    before_unrelated = detector.classify({"message": "Server started on port 8080"})
    confidences = []
    for message in FLAKY_STREAM:
        det = detector.classify({"message": message})
        assert det.pattern == "flaky_test", message
        confidences.append(det.confidence)
        exemplars.add(det.vector.reshape(1, -1), [det.pattern], "live")
    first, later = np.mean(confidences[:10]), np.mean(confidences[10:])
    assert later > first
    # Calibrated, not saturated: the learned evidence is bounded by how reliable
    # neighbour evidence proved out of fold.
    assert max(confidences) < 0.9999
    # Learning one pattern must not drag unrelated events towards it.
    after_unrelated = detector.classify({"message": "Server started on port 8080"})
    assert after_unrelated.pattern is None
    assert (
        after_unrelated.probabilities["flaky_test"]
        < 0.1 + before_unrelated.probabilities["flaky_test"]
    )
    # A passing run of the same tests is not flaky.
    passing = detector.classify({"message": "test_upload_resume in tests/test_storage.py passed"})
    assert passing.pattern != "flaky_test" or passing.confidence < 0.9


def test_learning_the_same_event_again_raises_its_confidence(
    embedder: StaticEmbedder, model: TrainedModel
) -> None:
    exemplars = seeded(embedder)
    detector = Detector(embedder, model, exemplars)
    event = {"message": "nightly job: spec checkout_flow.cy.ts timed out once, green on retry"}
    first = detector.classify(event)
    assert first.pattern == "flaky_test"
    for _ in range(5):
        exemplars.add(first.vector.reshape(1, -1), ["flaky_test"], "live")
    assert detector.classify(event).confidence > first.confidence


# -- hostile input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"message": None},
        {"message": ""},
        {"message": "   \n\t "},
        {"message": 42},
        {"message": ["a"]},
        {"message": b"bytes"},
        {"msg": "wrong key"},
        "a string",
        None,
        ["message"],
    ],
)
def test_event_without_usable_message_is_invalid(event: Any) -> None:
    with pytest.raises(InvalidPayload) as info:
        event_text(event)
    assert info.value.reason


def test_wrong_typed_fields_are_ignored_with_a_note() -> None:
    et = event_text(
        {
            "message": "boom",
            "line": "12",
            "file": 3,
            "severity": ["high"],
            "files": "a.py",
            "labels": [1, 2],
            "failure_rate": "often",
            "stack_trace": {"x": 1},
            "test_name": None,
        }
    )
    assert et.text == "boom"
    assert "field 'line' ignored: expected int, got str" in et.notes
    for key in ("file", "severity", "files", "labels", "failure_rate", "stack_trace"):
        assert any(f"field '{key}' ignored" in note for note in et.notes), key


def test_bool_is_not_a_line_number() -> None:
    et = event_text({"message": "boom", "file": "a.py", "line": True})
    assert "field 'line' ignored: expected int, got bool" in et.notes
    assert "line" not in et.text.split("\n")[1]


def test_fields_are_rendered_in_the_text() -> None:
    et = event_text(PLAN_EVENTS[4][0])
    assert et.notes == ()
    assert "failure rate: 40%" in et.text
    assert "test_concurrent_transactions" in et.text
    assert "last_10_runs" not in et.text


def test_huge_message_is_truncated_with_a_note(detector: Detector) -> None:
    et = event_text({"message": "Traceback " + "x" * 1_000_000})
    assert len(et.text) <= 4000
    assert any("truncated" in note for note in et.notes)
    det = detector.classify({"message": "y" * 1_000_000})
    check_invariants(det)
    assert det.notes


def test_invalid_unicode_is_replaced_with_a_note(detector: Detector) -> None:
    event = {"message": "bad \udc80\ud800 bytes \x00\x1b[31m red", "file": "a\udcff.py"}
    et = event_text(event)
    et.text.encode("utf-8")  # strictly encodable now
    assert any("unicode" in note for note in et.notes)
    check_invariants(detector.classify(event))


@pytest.mark.parametrize(
    "message", ["🔥🔥🔥", "\u200b\u200b", "ｆｕｌｌｗｉｄｔｈ", "\u0301\u0301", "ℌ𝔢𝔩𝔩𝔬", "\ufeff!"]
)
def test_odd_unicode_classifies_or_is_invalid(detector: Detector, message: str) -> None:
    try:
        det = detector.classify({"message": message})
    except InvalidPayload as exc:
        # only when nothing visible is left (zero-width and format characters)
        assert exc.reason == "field 'message' is empty"
        return
    check_invariants(det)


class Exploding(Mapping[str, Any]):
    """A mapping whose every access fails: the boundary must still answer InvalidPayload."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("no")

    def __iter__(self) -> Any:
        raise RuntimeError("no")

    def __len__(self) -> int:
        return 1


def test_a_broken_mapping_is_invalid_payload() -> None:
    with pytest.raises(InvalidPayload):
        event_text(Exploding())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "message",
    "severity",
    "file",
    "line",
    "error_type",
    "test_name",
    "test_file",
    "files",
    "failure_rate",
    "source",
    "labels",
    "stack_trace",
]
events = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10),
    json_values | st.text(alphabet=st.characters(), max_size=300),
    max_size=8,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events)
def test_event_text_never_raises_anything_else(event: dict[str, Any]) -> None:
    try:
        et = event_text(event)
    except InvalidPayload as exc:
        assert exc.reason
        return
    assert isinstance(et, EventText)
    assert et.text.strip()
    et.text.encode("utf-8")
    normalise(et.text)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(event=events)
def test_classify_never_raises_anything_else(detector: Detector, event: dict[str, Any]) -> None:
    try:
        det = detector.classify(event)
    except InvalidPayload:
        return
    check_invariants(det)


def test_load_devset_shape() -> None:
    data = load_devset()
    assert len(data) > 800
    for event, label, origin in data:
        assert label in LABELS
        assert origin.startswith("github:")
        assert "label" not in event and "origin" not in event and "kind" not in event
        assert isinstance(event["message"], str)


def test_devset_files_are_found_relative_to_the_module() -> None:
    from trinity.agents import detector as det_module

    assert (Path(det_module.__file__).parent / "data" / "devset_tools.jsonl").exists()
