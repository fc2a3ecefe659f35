"""The evaluation's bookkeeping: metrics of pooled decisions and the holdout's hygiene.

The holdout is only worth something while no repository in it is also in the dev set and
the dev-set loader (which seeds the store and trains the model) never reads it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import pytest

from trinity.agents.witness.dataset import DATA_DIR, load_devset
from trinity.agents.witness.evaluate import (
    HOLDOUTS,
    holdout_results,
    load_holdout,
    repository,
    summarise,
)
from trinity.agents.witness.model import Detection, Detector
from trinity.contract import LABELS, NONE


def test_summarise_counts_abstentions_as_none_and_fp_on_none() -> None:
    truth = ["flaky_test", "none", "none", "none", "duplication"]
    decided = ["flaky_test", "none", "feature_request", "none", "none"]
    out = summarise(truth, decided, [0.9, 0.8, 0.6, 0.7, 0.5])
    assert out["n"] == 5
    assert math.isclose(out["accuracy"], 3 / 5)
    assert math.isclose(out["none_fp_rate"], 1 / 3)
    assert out["per_class"]["duplication"]["recall"] == 0.0
    assert out["per_class"]["flaky_test"]["precision"] == 1.0
    assert set(out["per_class"]) == set(LABELS)
    assert 0.0 <= out["ece"] <= 1.0


@pytest.mark.parametrize("name", list(HOLDOUTS))
def test_holdout_is_real_labelled_and_disjoint_from_the_dev_set(name: str) -> None:
    holdout = load_holdout(name)
    assert len(holdout) >= 200
    assert {label for _, label, _ in holdout} == set(LABELS)
    dev_repos = {repository(origin) for _, _, origin in load_devset()}
    for event, _label, origin in holdout:
        assert origin.startswith(("github:", "https://")), origin
        assert repository(origin) not in dev_repos, origin
        assert isinstance(event["message"], str) and event["message"].strip()
        assert "label" not in event and "origin" not in event
    dev_messages = {event["message"] for event, _, _ in load_devset()}
    assert not dev_messages & {event["message"] for event, _, _ in holdout}


def test_the_fresh_holdout_is_as_specified_and_shares_no_source_with_any_other_file() -> None:
    """>= 400 events, >= 60 of each pattern and >= 100 none, one line per source, and no
    source (or text) of any other data file: it judges models it never shaped."""
    import json

    fresh = load_holdout("fresh holdout")
    counts = Counter(label for _, label, _ in fresh)
    assert len(fresh) >= 400 and counts[NONE] >= 100
    assert all(counts[label] >= 60 for label in LABELS if label != NONE), counts
    sources = [repository(o) for _, _, o in fresh]
    assert len(set(sources)) == len(sources)
    others = [json.loads(line) for path in sorted(DATA_DIR.glob("*.jsonl"))
              if path.name != "fresh_holdout.jsonl"
              for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    other_sources = {repository(row["origin"]) for row in others if "origin" in row}
    assert not other_sources & set(sources)
    texts = {row.get("message") or row.get("event", {}).get("message") for row in others}
    assert not texts & {event["message"] for event, _, _ in fresh}


def test_holdout_files_are_not_read_as_dev_set() -> None:
    assert sorted(p.name for p in DATA_DIR.glob("holdout_*.jsonl"))
    assert not [p for p in DATA_DIR.glob("devset_*.jsonl") if "holdout" in p.name]
    n_dev = sum(
        1
        for p in DATA_DIR.glob("devset_*.jsonl")
        for line in p.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    assert len(load_devset()) == n_dev


class _AlwaysNone:
    """A detector that abstains on everything (stands in for a trained one)."""

    def classify(self, event: Mapping[str, Any]) -> Detection:
        probs = {label: (1.0 if label == NONE else 0.0) for label in LABELS}
        return Detection(None, NONE, 1.0, probs, (), np.zeros(1), ())


def test_holdout_results_scores_every_item_once() -> None:
    scored = holdout_results(cast(Detector, _AlwaysNone()))
    assert set(scored) == set(HOLDOUTS)
    for name, out in scored.items():
        holdout = load_holdout(name)
        assert out["n"] == len(holdout)
        n_none = sum(1 for _, label, _ in holdout if label == NONE)
        assert math.isclose(out["accuracy"], n_none / len(holdout))
        assert out["none_fp_rate"] == 0.0
        assert len(out["errors"]) == len(holdout) - n_none
        assert out["repositories"] >= 200


def test_devset_follows_its_origins_policy() -> None:
    """Every dev-set line is labelled, names its public source, and no repository gives
    more than five lines (so no one project's wording dominates), no text twice."""
    dev = load_devset()
    assert {label for _, label, _ in dev} == set(LABELS)
    per_repo = Counter(repository(origin) for _, _, origin in dev)
    assert all(origin.startswith("github:") for _, _, origin in dev)
    assert max(per_repo.values()) <= 5, per_repo.most_common(3)
    messages = [event["message"] for event, _, _ in dev]
    assert len(set(messages)) == len(messages)


def test_pending_candidates_share_no_repository_with_holdout_or_dev_set() -> None:
    import json

    paths = sorted(DATA_DIR.glob("pending_*.jsonl"))
    rows = [json.loads(line) for path in paths
            for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert rows and {row["label"] for row in rows} == set(LABELS)
    taken = {repository(o) for _, _, o in load_devset()} | {
        repository(o) for name in HOLDOUTS for _, _, o in load_holdout(name)
    }
    assert not taken & {repository(row["origin"]) for row in rows}
    assert max(Counter(repository(row["origin"]) for row in rows).values()) <= 5


def test_repeated_cross_validation_pools_to_the_mean_of_its_repeats(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each repeat classifies every item once under its own seed's split: the pooled
    accuracy and FP rate are the repeats' means, supports count items once."""
    import trinity.agents.witness.evaluate as evaluate
    from trinity.agents.witness.embedding import load_embedder

    dev = load_devset()
    subset = [x for label in LABELS for x in [x for x in dev if x[1] == label][:14]]
    monkeypatch.setattr(evaluate, "load_devset", lambda: subset)
    cv = evaluate.cross_validate(2, 3, load_embedder(), repeats=2)
    assert [r["seed"] for r in cv["repeats"]] == [3, 4]
    assert cv["n"] == len(subset)
    assert math.isclose(cv["accuracy"], np.mean([r["accuracy"] for r in cv["repeats"]]))
    assert math.isclose(cv["none_fp_rate"], np.mean([r["none_fp_rate"] for r in cv["repeats"]]))
    assert sum(c["support"] for c in cv["per_class"].values()) == len(subset)
    assert {e["seed"] for e in cv["errors"]} <= {3, 4}
