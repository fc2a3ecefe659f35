"""The benchmark suite's table, built from given reports (no benchmark is run), and the
instant provider the pipeline benchmark uses."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.benchmarks.test_benchmarks import _load
from trinity.agents import delegates
from trinity.agents.models.policy import build_providers, parse_policy
from trinity.agents.models.providers.base import ChatRequest
from trinity.agents.models.providers.instant import ENABLE_VAR, InstantProvider
from trinity.errors import ConfigError


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    return _load("bench_all")


@pytest.fixture(scope="module")
def rows() -> ModuleType:
    return _load("report_rows")


def _report(rows: ModuleType, *figures: dict[str, Any]) -> dict[str, Any]:
    return {"some": "figures of its own", "rows": list(figures)}


def test_every_row_met_passes_with_references_and_ratios(suite: ModuleType,
                                                         rows: ModuleType) -> None:
    bus = _report(rows, rows.figure("bus: journaled throughput", 120_000, "msgs/s",
                                    reference=("raw pyzmq PUB/SUB", 200_000, "msgs/s"),
                                    target=">= 0.5 x reference", met=True))
    table = suite.table_rows([suite.Outcome("bus", 0, 1.0, bus)])
    assert [(r["benchmark"], r["name"], r["ratio"], r["met"]) for r in table] == [
        ("bus", "bus: journaled throughput", 0.6, True)]
    text = suite.format_table(table)
    assert "raw pyzmq PUB/SUB: 200,000 msgs/s" in text and "0.600" in text and "yes" in text


def test_a_missed_target_fails_the_suite(suite: ModuleType, rows: ModuleType,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = {
        "bus": _report(rows, rows.figure("bus: throughput", 1.0, "msgs/s",
                                         target=">= 0.5 x reference", met=True)),
        "pipeline": _report(rows,
                            rows.figure("pipeline: events/s", 180.0, "events/s",
                                        reference=("raw journal", 10_000, "commits/s"),
                                        target=">= 2,000 events/s", met=False),
                            rows.figure("pipeline: RSS", 210.0, "MB")),
    }
    monkeypatch.setattr(suite, "REPORTS", tmp_path)
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setattr(suite, "run_benchmark",
                        lambda name: suite.Outcome(name, 0 if name == "bus" else 1, 2.0,
                                                   given[name]))
    assert suite.main(["bus", "pipeline"]) == 1
    [md] = tmp_path.glob("bench_*.md")
    [js] = tmp_path.glob("bench_*.json")
    saved = json.loads(js.read_text())
    assert saved["all_met"] is False
    assert [(r["name"], r["met"]) for r in saved["rows"]] == [
        ("bus: throughput", True), ("pipeline: events/s", False), ("pipeline: RSS", None)]
    text = md.read_text()
    assert "| pipeline: events/s | 180 events/s | raw journal: 10,000 commits/s | 0.018 |" in text
    assert "Missed: pipeline: events/s." in text


def test_the_suite_passes_when_every_target_is_met(suite: ModuleType, rows: ModuleType,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    report = _report(rows, rows.figure("witness: p99", 1.6, "ms", target="<= 5 ms", met=True))
    monkeypatch.setattr(suite, "REPORTS", tmp_path)
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setattr(suite, "run_benchmark", lambda name: suite.Outcome(name, 0, 2.0, report))
    assert suite.main(["witness"]) == 0
    [md] = tmp_path.glob("bench_*.md")
    assert "Every target met." in md.read_text()


def test_a_missing_report_is_a_clear_failure_row(suite: ModuleType) -> None:
    table = suite.table_rows([suite.Outcome("llm", 1, 3.0, None,
                                            "exited 1 without writing bench_llm.json")])
    [row] = table
    assert row["name"] == "llm: benchmark failed" and row["met"] is False
    assert "exited 1 without writing bench_llm.json" in suite.format_table(table)


def test_run_benchmark_ignores_a_report_left_by_an_earlier_run(
        suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "bench_bus.json"
    stale.write_text(json.dumps({"rows": []}))
    monkeypatch.setattr(suite, "REPORTS", tmp_path)
    monkeypatch.setattr(suite.subprocess, "run",
                        lambda *a, **k: suite.subprocess.CompletedProcess(a, 3))
    out = suite.run_benchmark("bus")
    assert out.report is None and out.error == "exited 3 without writing bench_bus.json"


@pytest.mark.parametrize("bad, why", [
    ({"rows": []}, "its report has no rows"),
    ({"rows": [{"name": "x", "value": 1}]}, "row keys"),
    ({"rows": [{"name": "x", "value": "fast", "unit": "", "reference": None, "ratio": None,
                "target": None, "met": None}]}, "value 'fast' is not a finite number"),
    ({"rows": [{"name": "x", "value": 1, "unit": "", "reference": None, "ratio": None,
                "target": "<= 5 ms", "met": None}]}, "do not go together"),
])
def test_rows_of_another_shape_are_a_failure_row(suite: ModuleType, bad: dict[str, Any],
                                                 why: str) -> None:
    [row] = suite.table_rows([suite.Outcome("witness", 0, 1.0, bad)])
    assert row["met"] is False and why in row["error"]


def test_a_non_zero_exit_without_a_missed_row_is_a_failure(suite: ModuleType,
                                                           rows: ModuleType) -> None:
    report = _report(rows, rows.figure("24h: wall", 120.0, "s", target="<= 300 s", met=True))
    table = suite.table_rows([suite.Outcome("24h", 1, 1.0, report)])
    assert [(r["name"], r["met"]) for r in table] == [("24h: wall", True),
                                                       ("24h: benchmark failed", False)]


def test_a_figure_that_could_not_be_measured_is_null_and_missed(rows: ModuleType) -> None:
    row = rows.figure("pipeline: p99", float("nan"), "ms", target="<= 50 ms", met=False)
    assert row["value"] is None and rows.problem(row) is None
    assert rows.problem({**row, "met": True}) is not None
    with pytest.raises(ValueError):
        rows.figure("no verdict", 1.0, "ms", target="<= 50 ms")


# -- the instant provider --------------------------------------------------------------


@pytest.mark.parametrize("shape", [delegates.Plan, delegates.ProposedChange,
                                   delegates.RefactoringPlan, delegates.TestPlan,
                                   delegates.ImplementationPlan])
def test_instant_answers_are_valid_for_every_answer_shape(shape: Any) -> None:
    provider = InstantProvider("instant", env={ENABLE_VAR: "1"}, source="test")
    request = ChatRequest(messages=({"role": "user", "content": "x"},),
                          schema=delegates.schema_of(shape))
    answer = provider.complete(request, timeout_s=1.0, cancel=threading.Event())
    assert delegates.parse_as(shape)(answer)
    assert answer.usage.output_tokens == 0 and provider.price_model is None


def test_a_policy_naming_the_instant_provider_needs_it_enabled() -> None:
    policy = parse_policy({"providers": {"fast": {"kind": "instant"}},
                           "routes": [{"chain": ["fast"]}]}, "bench.toml")
    with pytest.raises(ConfigError, match=f"for benchmarks only; set {ENABLE_VAR}=1"):
        build_providers(policy, {})
    assert build_providers(policy, {ENABLE_VAR: "1"})["fast"].kind == "instant"


# -- each benchmark's rows ---------------------------------------------------------------


def test_each_benchmark_builds_rows_of_the_common_shape(rows: ModuleType) -> None:
    pipeline = _load("bench_pipeline")
    tier = {"label": "the latency target load", "offered_per_s": pipeline.LATENCY_RATE,
            "p99_ms": 51.0, "delivered_per_s": 199.0}
    at = {"exemplars": 1000, "journal_messages": 10, "store_files_mb": 1.0,
          "total_rss_mb": 200.0}
    thr = {"events_per_s": 2100.0, "exemplars_before": 10_050, "agents_cpu_ms_per_event": 0.9,
           "stages": {"witness": {"cpu_ms_per_message": 0.55}}}
    built = pipeline.build_rows({"commits_per_s": 9000, "p99_ms": 0.3}, [tier], thr,
                                {"after_phase": {"warm-up": at}, "mb_per_1000_exemplars": 2.0})
    witness = _load("bench_witness").table_rows(
        [{"size": 1000, "exemplars": 1026, "p99_ms": 1.2, "rss_mb": 97.0},
         {"size": 10_000, "exemplars": 10_000, "p99_ms": 5.5, "rss_mb": 124.0}])
    side = {"median_wall_s": 2.0, "median_ms_per_token": 20.0}
    llm = _load("bench_llm").table_rows({"agents": {
        name: {"basis": "wall", "agent": side, "direct": side, "overhead": 0.01,
               "target_met": True} for name in ("architect", "executor")}})
    for row in built + witness + llm:
        assert rows.problem(row) is None, row
    verdicts = {r["name"]: r["met"] for r in built + witness if r["met"] is not None}
    assert verdicts == {
        "pipeline: events/s end to end": True,
        "pipeline: WITNESS CPU per event at 10,050 exemplars (throughput phase)": False,
        "pipeline: p99 event-to-outcome at the latency target load (200 events/s)": False,
        "witness: p99 classification at 10,000 exemplars": False}
    assert [r["ratio"] for r in llm] == [1.01, 1.01]
    # the same verdicts decide the exit, for the targets BENCH_GATE names
    assert pipeline.target_verdicts([tier], thr) == {
        "events": True, "latency": False, "witness": False}
    thr["stages"]["witness"]["cpu_ms_per_message"] = 0.45
    assert pipeline.target_verdicts([tier], thr)["witness"] is True
    thr["exemplars_before"] = 1_200  # met, but not at the size the target names
    assert pipeline.target_verdicts([tier], thr)["witness"] is False
    assert pipeline.gates("") == {"events", "latency", "witness"}
    assert pipeline.gates("latency, witness") == {"latency", "witness"}
    with pytest.raises(SystemExit, match="unknown target"):
        pipeline.gates("latency,speed")
