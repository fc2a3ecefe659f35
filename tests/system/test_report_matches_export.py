"""The report's numbers, recomputed from the exported CSV files of the same run.

`trinity report` reads the stores and snapshots; `trinity export` writes them out as
CSV. Here every headline figure of the report is recomputed from the CSVs alone (plain
csv parsing, no project code) and compared with the Markdown the user reads."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import CompressedRun


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the report"
    return float(found.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def report_and_csv(compressed_run: CompressedRun
                   ) -> tuple[str, dict[str, list[dict[str, str]]], CompressedRun]:
    project = compressed_run.project
    out = project.root / "out"
    report = project.trinity("report", "--input", "logs/24h_test", "--output",
                             str(out / "report.md"), timeout=180)
    assert report.returncode == 0, report.stdout + report.stderr
    export = project.trinity("export", "--format", "csv", "--input", "logs/24h_test",
                             "--output", str(out / "csv"), timeout=180)
    assert export.returncode == 0, export.stdout + export.stderr
    tables = {name: _rows(out / "csv" / f"{name}.csv")
              for name in ("events", "outcomes", "llm_calls", "alerts", "metrics")}
    return (out / "report.md").read_text(encoding="utf-8"), tables, compressed_run


@pytest.mark.timeout(900)
def test_detection_figures_match_events_csv(report_and_csv: Any) -> None:
    text, tables, run = report_and_csv
    # the plan's events (the external ones have no ground truth to score)
    events = [e for e in tables["events"] if e["external"] == "false"]
    classified = [e for e in events if e["detected_at"]]
    correct = [e for e in classified
               if (e["detected_pattern"] or "none") == e["event_type"]]
    assert len(events) == run.events
    assert (f"Events: {len(events)} emitted of {run.events} planned, {len(classified)}"
            " classified") in text
    accuracy = 100 * len(correct) / len(classified)
    assert f"Detection accuracy: {accuracy:.1f}% ({len(correct)} of {len(classified)}" in text
    latencies = sorted(int(e["detection_latency_ms"]) / 1000 for e in classified)
    p95 = latencies[math.ceil(0.95 * len(latencies)) - 1]
    mean = sum(latencies) / len(latencies)
    assert _number(r"Detection latency: ([\d.]+) s average", text) == pytest.approx(mean, abs=0.006)
    assert _number(r"s average, ([\d.]+) s p95", text) == pytest.approx(p95, abs=0.006)
    for category in sorted({e["event_type"] for e in events} - {"none"}):
        mine = [e for e in classified if e["event_type"] == category]
        right = sum(1 for e in mine if e["detected_pattern"] == category)
        row = f"| {category} | {sum(1 for e in events if e['event_type'] == category)} | "
        assert f"{row}{len(mine)} | {right} | {100 * right / len(mine):.1f}% |" in text
    # every misclassified or missed event is an incident
    wrong = [e for e in classified if (e["detected_pattern"] or "none") != e["event_type"]]
    for event in wrong:
        assert f"cycle {int(event['cycle'])}: {event['event_type']} event" in text


@pytest.mark.timeout(900)
def test_cost_memory_and_alert_figures_match_the_other_csvs(report_and_csv: Any) -> None:
    text, tables, run = report_and_csv
    calls = tables["llm_calls"]
    total_in = sum(int(c["input_tokens"]) for c in calls)
    total_out = sum(int(c["output_tokens"]) for c in calls)
    assert f"Tokens: {total_in:,} in, {total_out:,} out" in text
    assert f"Total cost: ${sum(float(c['cost_usd']) for c in calls):.4f}" in text
    for agent in ("architect", "executor"):
        mine = [c for c in calls if c["agent"] == agent]
        local = 100 * sum(1 for c in mine if c["local"] == "true") / len(mine)
        assert (f"| {agent.upper()} | {len(mine)} | "
                f"${sum(float(c['cost_usd']) for c in mine):.4f} | {local:.1f}% |") in text
    metrics = tables["metrics"]
    assert len(metrics) == run.metrics_samples
    peak = max(float(v) for m in metrics for k, v in m.items() if k.startswith("rss_mb_") and v)
    assert f"peak {peak:.0f} MB RSS over {len(metrics)} samples" in text
    assert f"{len(tables['alerts'])} alerts)" in text
    for alert in tables["alerts"]:
        agent = f" [{alert['agent']}]" if alert["agent"] else ""
        assert f"{alert['kind']}{agent}: {alert['message']}" in text
    outcomes = tables["outcomes"]
    plan = [o for o in outcomes if o["external"] == "false"]
    assert f"{len({o['event_id'] for o in plan})} with an outcome" in text
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o["status"]] = statuses.get(o["status"], 0) + 1
    assert all(f"{n} {status}" in text.split("Outcomes: ", 1)[1].split("\n", 1)[0]
               for status, n in statuses.items())
    external = [e for e in tables["events"] if e["external"] == "true"]
    answered = {o["event_id"] for o in outcomes if o["external"] == "true"}
    assert (f"External events (trinity emit, no ground truth): {len(external)} arrived during"
            f" the run, {sum(bool(e['detected_at']) for e in external)} classified") in text
    assert f"{len(answered)} with an outcome" in text
