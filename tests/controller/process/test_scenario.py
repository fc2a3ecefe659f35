"""The scenario's shipped event variants and their seeded, reproducible selection."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from trinity.contract import NONE as NOISE
from trinity.contract import PATTERNS as CATEGORIES
from trinity.controller.process import scenario
from trinity.controller.process.scenario import (
    ScenarioDataError,
    event_for_cycle,
    load_variants,
    noise_for_cycle,
    parse_variants,
)

PLAN_MESSAGES = {
    "critical_error": "Fatal error: NoneType in production payment processing",
    "constitution_violation": "Type safety violation: Dict[Any, Any] in user model",
    "feature_request": "User requests dark mode toggle in settings",
    "duplication": "Duplicate validation logic found in 3 files",
    "flaky_test": "Test test_concurrent_transactions fails 40% of the time",
}


def _key(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True)


def test_categories_in_plan_order() -> None:
    assert CATEGORIES == ("critical_error", "constitution_violation", "feature_request",
                          "duplication", "flaky_test")


def test_counts_per_category() -> None:
    variants = load_variants()
    assert set(variants) == {*CATEGORIES, NOISE}
    for category in CATEGORIES:
        assert len(variants[category]) >= 15, category
    assert len(variants[NOISE]) >= 40


def test_plan_examples_shipped_once_each() -> None:
    variants = load_variants()
    for category, message in PLAN_MESSAGES.items():
        hits = [r for r in variants[category] if r["fields"]["message"] == message]
        assert len(hits) == 1, category
        assert hits[0]["origin"] == "test plan example"
    everything = [r["fields"]["message"] for rs in variants.values() for r in rs]
    assert len(everything) == len(set(everything)), "a message is shipped twice"


def _is_str_list(value: Any, min_len: int = 1) -> bool:
    return (isinstance(value, list) and len(value) >= min_len
            and all(isinstance(v, str) and v for v in value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rate_ok(value: Any) -> bool:
    if isinstance(value, str):
        return value.endswith("%") and 0 < float(value[:-1]) <= 100
    return isinstance(value, float) and 0 < value <= 1


def _check_fields(category: str, f: dict[str, Any]) -> None:
    if category == "critical_error":
        assert f["severity"] == "critical"
        assert _is_int(f["line"]) and f["file"] and f["error_type"]
        assert isinstance(f.get("stack_trace", ""), str)
    elif category == "constitution_violation":
        assert f["severity"] in {"critical", "high", "medium", "low"}
        assert _is_int(f["line"]) and f["file"] and f["violation_type"]
        assert _is_str_list(f["keywords"])
    elif category == "feature_request":
        assert f["priority"] in {"LOW", "NORMAL", "HIGH"}
        assert f["complexity"] in {"low", "medium", "high"}
        assert f["source"]
        assert "labels" not in f or _is_str_list(f["labels"])
        assert "user_intent" not in f, "the label must not ride along in the event"
    elif category == "duplication":
        assert _is_str_list(f["files"], min_len=2)
        ratio = f["duplication_ratio"]
        assert isinstance(ratio, float | int) and not isinstance(ratio, bool)
        assert 0 < ratio <= 1
        assert "pattern" not in f, "the label must not ride along in the event"
    elif category == "flaky_test":
        assert f["test_file"] and f["test_name"]
        assert _rate_ok(f["failure_rate"])
    else:
        assert set(f) <= {"message", "source", "severity"}


def test_every_shipped_line_valid() -> None:
    text = (scenario.importlib.resources.files(scenario.DATA_PACKAGE)
            .joinpath(scenario.DATA_FILE).read_text("utf-8"))
    assert text.endswith("\n")
    for number, line in enumerate(text.splitlines(), start=1):
        record = json.loads(line)
        assert set(record) == {"category", "fields", "origin"}, number
        category, fields = record["category"], record["fields"]
        assert category in {*CATEGORIES, NOISE}, number
        assert isinstance(record["origin"], str) and record["origin"].strip(), number
        assert isinstance(fields["message"], str) and fields["message"].strip(), number
        for name, value in fields.items():
            assert value is not None and value != "", (number, name)
        try:
            _check_fields(category, fields)
        except (AssertionError, KeyError) as exc:
            raise AssertionError(f"line {number} ({category}): {exc!r}") from exc


@pytest.mark.parametrize(("text", "needle"), [
    ('{"category": "none", "fields": {"message": "ok"}, "origin": "x"}\n{not json\n', "line 2"),
    ('{"category": "bogus", "fields": {"message": "ok"}, "origin": "x"}\n', "line 1"),
    ('{"category": "none", "fields": {"message": ""}, "origin": "x"}\n', "line 1"),
    ('{"category": "none", "fields": {"message": "ok"}}\n', "line 1"),
    ('{"category": "none", "fields": {"message": "ok"}, "origin": "x"}\n\n', "line 2"),
    ('{"category": "duplication", "fields": {"message": "m", "files": ["a"],'
     ' "duplication_ratio": true}, "origin": "x"}\n', "line 1"),
    ("[1, 2]\n", "line 1"),
])
def test_malformed_file_names_the_line(text: str, needle: str) -> None:
    with pytest.raises(ScenarioDataError, match=needle):
        parse_variants(text, "events.jsonl")


def test_category_without_variants_is_an_error() -> None:
    with pytest.raises(ScenarioDataError, match="no variants for"):
        parse_variants('{"category": "none", "fields": {"message": "ok"}, "origin": "x"}\n')


def test_rotation() -> None:
    for cycle in range(1, 49):
        category, _ = event_for_cycle(cycle, seed=7)
        assert category == CATEGORIES[(cycle - 1) % 5]
    assert event_for_cycle(1)[0] == "critical_error"
    assert event_for_cycle(2)[0] == "constitution_violation"
    assert event_for_cycle(6)[0] == "critical_error"


def test_event_belongs_to_its_category_pool() -> None:
    variants = load_variants()
    for cycle in range(1, 49):
        category, fields = event_for_cycle(cycle, seed=3)
        assert _key(fields) in {_key(r["fields"]) for r in variants[category]}


def test_deterministic_and_seed_dependent() -> None:
    first = [event_for_cycle(c, seed=11) for c in range(1, 49)]
    assert first == [event_for_cycle(c, seed=11) for c in range(1, 49)]
    other = [event_for_cycle(c, seed=12) for c in range(1, 49)]
    assert first != other
    assert [event_for_cycle(c) for c in range(1, 11)] == [
        event_for_cycle(c, seed=0) for c in range(1, 11)]


def test_same_events_in_another_process() -> None:
    """String seeds, not the salted hash(): a fresh interpreter picks the same events."""
    code = ("import json; from trinity.controller.process.scenario import event_for_cycle as e, "
            "noise_for_cycle as n; print(json.dumps([[e(c, 5) for c in range(1, 13)], "
            "n(9, 5, 4)]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={"PYTHONHASHSEED": "123"}, timeout=60).stdout
    events, noise = json.loads(out)
    assert [tuple(e) for e in events] == [event_for_cycle(c, 5) for c in range(1, 13)]
    assert noise == noise_for_cycle(9, 5, 4)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_no_repeat_before_pool_exhausted(seed: int) -> None:
    variants = load_variants()
    seen: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for cycle in range(1, 49):
        category, fields = event_for_cycle(cycle, seed=seed)
        seen[category].append(_key(fields))
    for category, keys in seen.items():
        pool = len(variants[category])
        for start in range(0, len(keys), pool):
            window = keys[start:start + pool]
            assert len(window) == len(set(window)), category
    # beyond 48 cycles: a full pass over the largest pool uses every variant exactly once
    pool = len(variants["critical_error"])
    keys = [_key(event_for_cycle(1 + 5 * k, seed=seed)[1]) for k in range(pool)]
    assert sorted(keys) == sorted(_key(r["fields"]) for r in variants["critical_error"])


def test_variants_are_spread_over_seeds() -> None:
    firsts = Counter(event_for_cycle(1, seed=s)[1]["message"] for s in range(60))
    assert len(firsts) >= 10


def test_noise_deterministic_distinct_and_from_pool() -> None:
    pool = {_key(r["fields"]) for r in load_variants()[NOISE]}
    assert noise_for_cycle(3, 1, 0) == []
    batch = noise_for_cycle(3, 1, 5)
    assert batch == noise_for_cycle(3, 1, 5)
    assert len(batch) == 5 and len({_key(f) for f in batch}) == 5
    assert all(_key(f) in pool for f in batch)
    assert batch != noise_for_cycle(4, 1, 5) or batch != noise_for_cycle(3, 2, 5)
    assert noise_for_cycle(3, 1, 2) == batch[:2]
    big = noise_for_cycle(8, 0, len(pool) + 7)
    assert len(big) == len(pool) + 7
    assert {_key(f) for f in big} == pool


@pytest.mark.parametrize(("cycle", "count"), [(0, 1), (-1, 1), (1, -1)])
def test_bad_arguments(cycle: int, count: int) -> None:
    with pytest.raises(ValueError):
        noise_for_cycle(cycle, 0, count)
    if cycle < 1:
        with pytest.raises(ValueError):
            event_for_cycle(cycle)


def test_returned_dicts_are_independent_copies() -> None:
    _, fields = event_for_cycle(2, seed=9)
    fields["message"] = "changed"
    fields["keywords"].append("mutated")
    assert event_for_cycle(2, seed=9)[1] != fields
    assert "mutated" not in event_for_cycle(2, seed=9)[1]["keywords"]
    noise = noise_for_cycle(1, 9, 3)
    noise[0]["message"] = "changed"
    assert noise_for_cycle(1, 9, 3)[0]["message"] != "changed"
    variants = load_variants()
    variants["duplication"][0]["fields"]["files"].clear()
    variants[NOISE].clear()
    again = load_variants()
    assert again["duplication"][0]["fields"]["files"] and again[NOISE]
