"""An independent reading of a run's records (plain SQL and JSON, no report code), and
the check of a report against it: shared by the report's tests on a small run written
through the project's own writers (tests/controller/reports/test_report.py) and on real
runs (tests/system/test_report.py)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner, Result
from matplotlib.image import imread

from trinity.cli.reports import report as report_command
from trinity.contract import NONE as NOISE
from trinity.controller.reports import report
from trinity.controller.reports.charts import PNG_SIGNATURE
from trinity.controller.reports.report import recommend
from trinity.settings import Settings
from trinity.stores.run_logs import read_alerts

# -- an independent reading of a run's records (plain SQL and JSON, no report code) -----

def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _snapshot_files(log_dir: Path, folder: str, run_id: str) -> list[dict[str, Any]]:
    found = []
    for path in (log_dir / folder).glob("*.json"):
        snap = json.loads(path.read_text())
        if snap.get("run_id") == run_id:
            found.append(snap)
    return sorted(found, key=lambda s: s["elapsed_hours"])


@dataclass
class Recomputed:
    classified: int
    correct: int
    latency_mean_s: float
    latency_p95_s: float
    confidence_mean: float
    confidences: list[tuple[float, float]]  # (event hour, confidence), in event order
    cost_total: float
    cost_by_agent: dict[str, tuple[int, float, float]]  # agent -> (calls, usd, local share)
    cumulative_cost: list[tuple[float, float]]
    local_share: float | None
    memory_peak_mb: float
    memory_series: list[tuple[float, float]]
    accuracy_series: list[tuple[float, float]]
    crash_alerts: int
    statuses: dict[str, int]  # every outcome of the run's events (external ones included)
    failed: list[tuple[str, str, str, str]]  # (task, event, agent, status), in record order
    external: list[tuple[str, str | None, list[str]]]  # (event, pattern, outcome statuses)


def recompute(root: Path, log_dir: Path, run_id: str) -> Recomputed:
    journal = _ro(root / "trinity_messages.db")
    events = journal.execute(
        "SELECT event_id, category, emitted_ms, sim_elapsed_s FROM events WHERE run_id=?"
        " ORDER BY sim_elapsed_s, cycle, noise", (run_id,)).fetchall()
    started, ended = journal.execute("SELECT started_ms, ended_ms FROM runs WHERE run_id=?",
                                     (run_id,)).fetchone()
    external_ids = [e for (e,) in journal.execute(
        "SELECT event_id FROM emitted_events WHERE run_id=? ORDER BY emitted_ms, event_id",
        (run_id,))]
    outcomes = journal.execute(
        "SELECT task_id, event_id, delegate, status FROM outcomes WHERE event_id IN"
        " (SELECT event_id FROM events WHERE run_id=:run UNION ALL"
        "  SELECT event_id FROM emitted_events WHERE run_id=:run)"
        " ORDER BY recorded_ms, rowid", {"run": run_id}).fetchall()
    journal.close()
    statuses: dict[str, int] = {}
    for *_, status in outcomes:
        statuses[status] = statuses.get(status, 0) + 1
    patterns = _ro(root / "trinity_patterns.db")
    found = {e: (p, c, t) for e, p, c, t in patterns.execute(
        "SELECT event_id, pattern, confidence, detected_ms FROM detections WHERE run_id=?",
        (run_id,))}
    patterns.close()
    classified = [(e, truth, emitted) for e, truth, emitted, _ in events if e in found]
    correct = sum((found[e][0] or NOISE) == truth for e, truth, _ in classified)
    latencies = [(found[e][2] - emitted) / 1000 for e, _, emitted in classified]
    confidences = [(sim / 3600, found[e][1]) for e, _, _, sim in events
                   if e in found and found[e][0] is not None]
    costs = _ro(root / "trinity_costs.db")
    by_agent = {a: (n, usd, local) for a, n, usd, local in costs.execute(
        "SELECT agent, count(*), sum(cost_usd), avg(local) FROM calls WHERE run_id=?"
        " GROUP BY agent", (run_id,))}
    cumulative, total = [], 0.0
    for sim, usd in costs.execute(
            "SELECT coalesce(sim_elapsed_s, 0), cost_usd FROM calls WHERE run_id=?"
            " ORDER BY coalesce(sim_elapsed_s, 0), ts_ms, rowid", (run_id,)):
        total += usd
        cumulative.append((sim / 3600, total))
    costs.close()
    calls = sum(n for n, _, _ in by_agent.values())
    metrics = _snapshot_files(log_dir, "metrics", run_id)
    stats = _snapshot_files(log_dir, "patterns", run_id)
    crashes = [a for a in read_alerts(log_dir / "alerts.log")
               if a.get("kind") in ("agent_crashed", "agent_fatal")
               and (a.get("run_id") == run_id
                    or started <= a["ts_ms"] <= (ended or a["ts_ms"]))]
    return Recomputed(
        classified=len(classified), correct=correct,
        latency_mean_s=_mean(latencies),
        latency_p95_s=float(np.percentile(latencies, 95, method="inverted_cdf")),
        # every detection of the run, external events' included (the chart: the plan's)
        confidence_mean=_mean([c for p, c, _ in found.values() if p is not None]),
        confidences=confidences,
        cost_total=sum(usd for _, usd, _ in by_agent.values()), cost_by_agent=by_agent,
        cumulative_cost=cumulative,
        local_share=sum(n * local for n, _, local in by_agent.values()) / calls
        if calls else None,
        memory_peak_mb=max(s["memory_max_process_rss_mb"] for s in metrics),
        memory_series=[(s["elapsed_hours"], s["memory_max_process_rss_mb"]) for s in metrics],
        accuracy_series=[(s["elapsed_hours"], s["scoring"]["accuracy"]) for s in stats
                         if s["scoring"]["accuracy"] is not None],
        crash_alerts=len(crashes), statuses=statuses,
        failed=[o for o in outcomes if o[3] in ("failed", "plan_failed")],
        external=[(e, found[e][0] if e in found else None,
                   [o[3] for o in outcomes if o[1] == e]) for e in external_ids])


def _mean(values: list[float]) -> float:
    """The average as the report takes it: exactly rounded (``math.fsum``), so that the
    two agree to the last bit whatever order each reads the records in."""
    return math.fsum(values) / len(values)


def _series(plotted: dict[str, Any], label: str) -> list[tuple[float, float]]:
    xs, ys = plotted.get(label, ((), ()))
    return list(zip(xs, ys, strict=True))


def _same(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x1, x2, abs_tol=1e-6) and math.isclose(y1, y2, abs_tol=1e-6)
        for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def check_report_against_records(root: Path, log_dir: Path, out_dir: Path) -> str:
    """Write the report of the run ``log_dir`` holds and hold every figure and chart
    against ``recompute``; returns the Markdown."""
    result = invoke(root, "--input", str(log_dir), "--output", str(out_dir / "r.md"))
    assert result.exit_code == 0, result.output
    run_id = json.loads((log_dir / "test_config.json").read_text())["run_id"]
    want = recompute(root, log_dir, run_id)
    text = (out_dir / "r.md").read_text()
    assert (f"Detection accuracy: {want.correct / want.classified:.1%} ({want.correct} of "
            f"{want.classified} classified events correct") in text
    assert (f"Detection latency: {want.latency_mean_s:.2f} s average, "
            f"{want.latency_p95_s:.2f} s p95") in text
    assert f"Pattern confidence: {want.confidence_mean:.3f} average" in text
    assert f"peak {want.memory_peak_mb:.0f} MB RSS" in text
    assert f"{want.crash_alerts} unexpected exits" in text
    assert f"Total cost: {recommend._usd(want.cost_total)} /" in text
    if want.local_share is not None:
        assert f"Cost efficiency: {want.local_share:.1%} of model calls local" in text
    for agent, (calls, usd, local) in want.cost_by_agent.items():
        assert f"| {agent.upper()} | {calls} | {recommend._usd(usd)} | {local:.1%} |" in text
    # every outcome counted, the failed ones listed, the external events shown
    failed = [s for s in ("plan_failed", "failed") if want.statuses.get(s)]
    shown = [*failed, *sorted(s for s in want.statuses if s not in failed)]
    assert "Outcomes: " + ", ".join(f"{want.statuses[s]} {s}" for s in shown) in text
    assert ("## Failed Tasks" in text) == bool(want.failed)
    for task, event, agent, status in want.failed:
        external = " (external)" if event in {e for e, _, _ in want.external} else ""
        assert f"| {task} | {event}{external} | {agent.upper()} | {status} | " in text
    assert ("## External Events" in text) == bool(want.external)
    if want.external:
        given = sum(p is not None for _, p, _ in want.external)
        assert (f"External events (trinity emit, no ground truth): {len(want.external)} "
                f"arrived during the run, {len(want.external)} classified ({given} given a "
                f"pattern), {sum(bool(o) for _, _, o in want.external)} with an outcome") in text
    for event, pattern, statuses in want.external:
        assert f"| {event} | " in text
        assert f"| {pattern or 'no pattern'} | " in text and ", ".join(statuses) in text
    # the charts: real PNGs, linked from the Markdown, drawn from the same records
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(root)})
    data = report.build_report_data(settings, log_dir, run_id)
    drawn = {c.key: c for c in report.write_charts(data, out_dir / "again", "r")}
    for key in report.CHART_KEYS:
        png = out_dir / f"r_{key}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert f"](r_{key}.png)" in text
    assert _same(_series(drawn["accuracy"].plotted, "accuracy (cumulative)"),
                 want.accuracy_series)
    assert _same(_series(drawn["memory"].plotted, "largest process RSS (the limit's measure)"),
                 want.memory_series)
    assert _same(_series(drawn["confidence"].plotted, "detection confidence"),
                 want.confidences)
    if want.cumulative_cost:
        assert _same(_series(drawn["cost"].plotted, "cost: total"), want.cumulative_cost)
        calls = _series(drawn["cost"].plotted, "model calls (cumulative)")
        assert [y for _, y in calls] == list(range(1, len(want.cumulative_cost) + 1))
    return text


def invoke(root: Path, *args: str) -> Result:
    env = {"TRINITY_DATA_DIR": str(root), "TRINITY_LOG_DIR": None}
    return CliRunner().invoke(report_command, list(args), env=env)
