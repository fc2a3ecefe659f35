"""Cross-validate WITNESS's detector on the shipped dev set: ``trinity witness eval``.

Folds are grouped by repository (``origin`` ``github:owner/repo...``), so no repository
straddles train and test: a held-out fold is text from projects the model never saw,
which is the closest the dev set gets to "real-world events it has never seen".

In each fold the model is trained on the training part only (its own inner folds choose
the calibration and threshold; the held-out fold is never looked at), the training
part's events are loaded as exemplars (as the pattern store is seeded), and each held-out
event is classified once, without learning from it.

Reported, over all held-out predictions pooled:

* accuracy - a decision is correct when the returned pattern equals the label, or when
  the detector abstains and the label is ``none``;
* per-class precision / recall / F1 and macro-F1 over the six decisions (abstention =
  ``none``);
* false-positive rate on none - share of ``none`` events given any pattern;
* ECE - expected calibration error of the decision's confidence: 15 equal-width bins on
  [0, 1] over ``Detection.confidence`` (the calibrated probability of the returned
  pattern, or of ``none`` when abstaining), ECE = sum_b (n_b / n) * |acc_b - conf_b|
  with acc_b the share of correct decisions in the bin.

Then, once each, the holdouts (``agents/data/holdout_*.jsonl`` and the fresh
``fresh_holdout.jsonl``: real events from sources that appear nowhere in the dev set,
collected before any tuning and never used for it) are scored by the full-dev-set model
and exemplars, and the same metrics are printed beside the cross-validation ones: the
estimate of how WITNESS does on events collected by others. The exit status stays
driven by the cross-validation targets only.

Exit status 1 unless accuracy >= 0.95, FP on none <= 0.05 and ECE <= 0.05 (CV, the
means over ``--repeats`` seeds, 5 by default).
"""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold  # type: ignore[import-untyped,unused-ignore]

from trinity.agents.witness.dataset import load_devset, load_labelled, load_plan_events
from trinity.agents.witness.embedding import Embedder, load_embedder
from trinity.agents.witness.exemplars import InMemoryExemplars
from trinity.agents.witness.model import Detector
from trinity.agents.witness.text import event_text
from trinity.agents.witness.train import train
from trinity.contract import LABELS, NONE
from trinity.plan import LONG_RUN_ACCURACY

TARGET_ACCURACY = LONG_RUN_ACCURACY  # the plan's detection accuracy over time
TARGET_NONE_FP = 0.05
TARGET_ECE = 0.05
ECE_BINS = 15

# The test plan's own example events and the confidence the plan expects for each.
PLAN_EVENTS = load_plan_events()

SANITY_NEGATIVES = (
    "hello world",
    "Server started on port 8080",
    "Bump requests from 2.31.0 to 2.32.0",
    "Added tests for error handling",
)

_REPO = re.compile(r"^github:([^/#:\s]+/[^/#:\s]+)")


def repository(origin: str) -> str:
    """``github:owner/repo#12`` / ``github:owner/repo/path`` -> ``owner/repo`` (lower-case)."""
    m = _REPO.match(origin)
    return (m.group(1) if m else origin).lower()


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds (edges[b], edges[b+1]]; confidence 0 goes to the first bin
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def per_class(truth: Sequence[str], decided: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    t = np.array(truth)
    d = np.array(decided)
    for label in LABELS:
        tp = int(((d == label) & (t == label)).sum())
        fp = int(((d == label) & (t != label)).sum())
        fn = int(((d != label) & (t == label)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[label] = {"precision": p, "recall": r, "f1": f1, "support": int((t == label).sum())}
    return out


def summarise(
    truth: Sequence[str], decided: Sequence[str], confidence: Sequence[float]
) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1, macro-F1, FP rate on none and ECE of pooled decisions."""
    t = np.array(truth)
    d = np.array(decided)
    correct = (t == d).astype(np.float64)
    classes = per_class(truth, decided)
    none_mask = t == NONE
    return {
        "n": len(truth),
        "accuracy": float(correct.mean()) if len(truth) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in classes.values()])),
        "none_fp_rate": float((d[none_mask] != NONE).mean()) if none_mask.any() else 0.0,
        "ece": expected_calibration_error(np.array(confidence, dtype=np.float64), correct)
        if len(truth)
        else 0.0,
        "mean_confidence": float(np.mean(confidence)) if len(truth) else 0.0,
        "per_class": classes,
    }


# The holdouts, each scored once by the full-dev-set model: the first one collected
# (``holdout_*.jsonl``) and the fresh one, frozen before the model changes it judges.
HOLDOUTS = {"holdout": "holdout_*.jsonl", "fresh holdout": "fresh_holdout.jsonl"}


def load_holdout(name: str = "holdout") -> list[tuple[dict[str, Any], str, str]]:
    """(event, label, origin) for every line of the holdout ``name``, like the dev set."""
    return load_labelled(HOLDOUTS[name])


def _decide(
    detector: Detector, items: Sequence[tuple[Mapping[str, Any], str, str]]
) -> tuple[list[str], list[str], list[float], list[dict[str, Any]]]:
    truth: list[str] = []
    decided: list[str] = []
    confidence: list[float] = []
    errors: list[dict[str, Any]] = []
    for event, label, origin in items:
        det = detector.classify(event)
        decision = det.pattern or NONE
        truth.append(label)
        decided.append(decision)
        confidence.append(det.confidence)
        if decision != label:
            errors.append(
                {
                    "origin": origin,
                    "label": label,
                    "decided": decision,
                    "best": det.label,
                    "confidence": round(det.confidence, 3),
                    "message": str(event["message"])[:120],
                }
            )
    return truth, decided, confidence, errors


def _detector_for(
    embedder: Embedder,
    train_items: Sequence[tuple[Mapping[str, Any], str, str]],
) -> tuple[Detector, float]:
    started = time.perf_counter()
    model = train(
        [(e, lab) for e, lab, _ in train_items],
        embedder,
        groups=[repository(o) for _, _, o in train_items],
    )
    seconds = time.perf_counter() - started
    exemplars = InMemoryExemplars(embedder.dim)
    vectors = embedder.embed([event_text(e).text for e, _, _ in train_items])
    exemplars.add(vectors, [lab for _, lab, _ in train_items], "seed")
    return Detector(embedder, model, exemplars), seconds


def cross_validate(
    folds: int, seed: int, embedder: Embedder, repeats: int = 1
) -> dict[str, Any]:
    """Grouped ``folds``-fold CV, repeated with seeds ``seed .. seed + repeats - 1``.

    Every repeat classifies each dev-set item once, so the pooled metrics are the means
    over repeats (ECE is that of the pooled decisions); ``repeats`` lists each one's.
    One split's accuracy moves by +-0.004 with the seed alone (0.955-0.962 over seeds
    0-4), so the figure is the mean of several.
    """
    data = load_devset()
    labels = np.array([lab for _, lab, _ in data])
    groups = np.array([repository(o) for _, _, o in data])
    truth: list[str] = []
    decided: list[str] = []
    confidence: list[float] = []
    train_seconds: list[float] = []
    errors: list[dict[str, Any]] = []
    per_repeat: list[dict[str, Any]] = []
    for s in range(seed, seed + repeats):
        start = len(truth)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=s)
        for tr, te in splitter.split(np.zeros(len(data)), labels, groups):
            detector, seconds = _detector_for(embedder, [data[i] for i in tr])
            train_seconds.append(seconds)
            t, d, c, e = _decide(detector, [data[i] for i in te])
            truth += t
            decided += d
            confidence += c
            errors += [{**err, "seed": s} for err in e]
        one = summarise(truth[start:], decided[start:], confidence[start:])
        per_repeat.append({"seed": s, **{k: one[k] for k in _REPEAT_KEYS}})
    pooled = summarise(truth, decided, confidence)
    return {
        "folds": folds,
        "seed": seed,
        **pooled,
        "n": len(data),
        "per_class": {label: {**c, "support": c["support"] // repeats}
                      for label, c in pooled["per_class"].items()},
        "repeats": per_repeat,
        "train_seconds_mean": float(np.mean(train_seconds)),
        "errors": errors,
    }


_REPEAT_KEYS = ("accuracy", "macro_f1", "none_fp_rate", "ece")


def holdout_results(detector: Detector) -> dict[str, dict[str, Any]]:
    """Each holdout scored once by ``detector`` (full dev set), by name (those present)."""
    found = {}
    for name in HOLDOUTS:
        items = load_holdout(name)
        if not items:
            continue
        truth, decided, confidence, errors = _decide(detector, items)
        repos = {repository(o) for _, _, o in items}
        found[name] = {**summarise(truth, decided, confidence), "repositories": len(repos),
                       "errors": errors}
    return found


def full_detector(embedder: Embedder) -> tuple[Detector, float]:
    """Model and exemplars from the full dev set (as a fresh install seeds the store)."""
    return _detector_for(embedder, load_devset())


def plan_results(detector: Detector, seconds: float) -> dict[str, Any]:
    """The test plan's events and the sanity negatives, model and exemplars = full dev set."""
    plan = []
    for event, expected, minimum in PLAN_EVENTS:
        det = detector.classify(event)
        plan.append(
            {
                "message": event["message"],
                "expected": expected,
                "minimum": minimum,
                "pattern": det.pattern,
                "confidence": det.confidence,
                "ok": det.pattern == expected and det.confidence > minimum,
            }
        )
    negatives = []
    for message in SANITY_NEGATIVES:
        det = detector.classify({"message": message})
        negatives.append(
            {
                "message": message,
                "pattern": det.pattern,
                "best": det.label,
                "confidence": det.confidence,
                "ok": det.pattern is None,
            }
        )
    return {
        "train_seconds_full": seconds,
        "threshold": detector.model.threshold,
        "class_thresholds": detector.model.class_thresholds,
        "temperature": detector.model.temperature,
        "plan": plan,
        "negatives": negatives,
    }


def _print_report(
    cv: Mapping[str, Any],
    plan: Mapping[str, Any],
    holdout: Mapping[str, Mapping[str, Any]] | None,
    show_errors: bool,
) -> None:
    repeats = cv["repeats"]
    seeds = (f"seed {cv['seed']}" if len(repeats) == 1
             else f"{len(repeats)} repeats, seeds {repeats[0]['seed']}-{repeats[-1]['seed']}")
    print(f"{cv['folds']}-fold cross-validation grouped by repository ({seeds}), n={cv['n']}"
          + ("; figures pooled over the repeats (= their means)" if len(repeats) > 1 else ""))
    print(f"{'label':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for label, c in cv["per_class"].items():
        print(
            f"{label:<24}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}"
            f"{c['support']:>10d}"
        )
    print(f"accuracy        {cv['accuracy']:.3f}   (target >= {TARGET_ACCURACY})")
    print(f"macro-F1        {cv['macro_f1']:.3f}")
    print(f"FP rate on none {cv['none_fp_rate']:.3f}   (target <= {TARGET_NONE_FP})")
    print(
        f"ECE ({ECE_BINS} bins)   {cv['ece']:.3f}   (target <= {TARGET_ECE}; "
        "confidence of the returned decision, p(none) for abstentions)"
    )
    if len(repeats) > 1:
        for key, name in (("accuracy", "accuracy"), ("none_fp_rate", "FP rate on none"),
                          ("ece", "ECE")):
            values = [r[key] for r in repeats]
            print(f"  {name} by seed: " + " ".join(f"{v:.3f}" for v in values)
                  + f"  (range {min(values):.3f}-{max(values):.3f})")
    print(
        f"train time      {cv['train_seconds_mean']:.2f} s per fold, "
        f"{plan['train_seconds_full']:.2f} s on the full dev set"
    )
    per_class_t = plan.get("class_thresholds")
    per_class_s = (
        ", ".join(f"{lab} {t:.2f}" for lab, t in zip(LABELS, per_class_t, strict=False))
        if per_class_t
        else "-"
    )
    print(
        f"threshold {plan['threshold']:.2f} (per pattern: {per_class_s}), "
        f"temperature {plan['temperature']:.2f} (full-dev-set model; a pattern is returned "
        "when p(pattern) / (p(pattern) + p(none)) reaches its threshold)"
    )
    if holdout:
        _print_holdout(cv, holdout)
    print("test-plan events (model and exemplars = full dev set):")
    for r in plan["plan"]:
        mark = "ok " if r["ok"] else "FAIL"
        print(
            f"  {mark} {r['expected']:<23} > {r['minimum']:.2f}: got {r['pattern']} "
            f"{r['confidence']:.3f}  | {r['message']}"
        )
    print("sanity negatives (must abstain):")
    for r in plan["negatives"]:
        mark = "ok " if r["ok"] else "FAIL"
        print(
            f"  {mark} {r['pattern']} (best {r['best']}, confidence {r['confidence']:.3f})"
            f"  | {r['message']}"
        )
    if show_errors:
        print("held-out errors (cross-validation):")
        for e in cv["errors"]:
            print(
                f"  seed {e['seed']} {e['label']:<23}-> {e['decided']:<23}"
                f"{e['confidence']:.2f} {e['origin']}: {e['message']!r}"
            )


def _print_holdout(cv: Mapping[str, Any], holdouts: Mapping[str, Mapping[str, Any]]) -> None:
    for name, ho in holdouts.items():
        print(f"{name} (never tuned on): n={ho['n']} from {ho['repositories']} sources "
              "absent from the dev set")
    print("full-dev-set model and exemplars, each event classified once")
    print(f"{'':<24}{'CV':>10}" + "".join(f"{name:>15}" for name in holdouts))
    for key, title in (
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("none_fp_rate", "FP rate on none"),
        ("ece", "ECE"),
    ):
        print(f"{title:<24}{cv[key]:>10.3f}"
              + "".join(f"{ho[key]:>15.3f}" for ho in holdouts.values()))
    for name, ho in holdouts.items():
        print(f"{name + ' label':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for label, c in ho["per_class"].items():
            print(
                f"{label:<24}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}"
                f"{c['support']:>10d}"
            )


@dataclass(frozen=True)
class Evaluation:
    """Grouped cross-validation on the dev set, the full model on the plan's own events,
    the holdout (None when skipped) and whether the targets are met."""

    cv: dict[str, Any]
    plan: dict[str, Any]
    holdout: dict[str, dict[str, Any]] | None  # by name (holdout, fresh holdout)
    passed: bool
    max_rss_mb: float

    def as_json(self, *, errors: bool = False, holdout_errors: bool = False) -> dict[str, Any]:
        cv = self.cv if errors else {k: v for k, v in self.cv.items() if k != "errors"}
        holdouts = {name.replace(" ", "_"): {k: v for k, v in ho.items()
                                             if holdout_errors or k != "errors"}
                    for name, ho in (self.holdout or {}).items()}
        return {"cv": cv, **holdouts, **self.plan, "max_rss_mb": self.max_rss_mb,
                "passed": self.passed}


def evaluate(folds: int = 5, seed: int = 0, repeats: int = 5, *,
             holdout: bool = True) -> Evaluation:
    """Everything ``trinity witness eval`` reports (the holdout only with ``holdout``)."""
    embedder = load_embedder()
    cv = cross_validate(folds, seed, embedder, repeats)
    detector, seconds = full_detector(embedder)
    plan = plan_results(detector, seconds)
    scored = holdout_results(detector) if holdout else None
    passed = (
        cv["accuracy"] >= TARGET_ACCURACY
        and cv["none_fp_rate"] <= TARGET_NONE_FP
        and cv["ece"] <= TARGET_ECE
    )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Evaluation(cv, plan, scored, passed, rss_mb)


def print_results(result: Evaluation, *, errors: bool = False,
                  holdout_errors: bool = False) -> None:
    """The evaluation as text; ``holdout_errors`` lists the holdout's misses (for the final
    analysis only: never tune on them)."""
    _print_report(result.cv, result.plan, result.holdout, errors)
    for name, ho in (result.holdout or {}).items() if holdout_errors else ():
        print(f"{name} errors:")
        for e in ho["errors"]:
            print(
                f"  {e['label']:<23}-> {e['decided']:<23}{e['confidence']:.2f} "
                f"{e['origin']}: {e['message']!r}"
            )
    print(f"max RSS {result.max_rss_mb:.0f} MB")
    print("PASS" if result.passed else "FAIL: targets not met")
