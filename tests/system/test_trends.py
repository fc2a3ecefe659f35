"""``trinity trends`` over real compressed runs in one project folder: three 2-hour smoke
tests and a 24-hour full run (six events, so it takes as long), each started by
``trinity run`` as a user would, so that every earlier run's logs are moved to
``logs/archive/<run id>``. Each run's figures in the trends are checked against what
``trinity report`` prints for that run (its archive folder as ``--input``), and against
a plain reading of its snapshot files and of the pattern store.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from tests.conftest import BIN, Project
from tests.system.conftest import fresh_project
from trinity.controller.reports.charts import PNG_SIGNATURE

TIME_SCALE = "2880"
# (kind, trinity run arguments): the full run's 24 hours take ~30 s at 2880x with an
# event every 4 simulated hours.
RUNS = (("smoke", ("--duration", "2")),
        ("smoke", ("--duration", "2")),
        ("full", ("--duration", "24", "--event-interval", "240")),
        ("smoke", ("--duration", "2")))
WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class Runs:
    project: Project
    run_ids: tuple[str, ...]  # in the order started
    kinds: tuple[str, ...]
    seconds: tuple[float, ...]  # each run's real duration

    @property
    def logs(self) -> Path:
        return self.project.root / "logs"

    def log_dir(self, run_id: str) -> Path:
        latest = self.logs / "24h_test"
        return latest if run_id == self.run_ids[-1] else self.logs / "archive" / run_id


@pytest.fixture(scope="module")
def four_runs() -> Iterator[Runs]:
    with fresh_project("ttr") as project:
        ids, seconds = [], []
        for _, args in RUNS:
            started = time.monotonic()
            done = project.trinity("run", *args, "--time-scale", TIME_SCALE, timeout=300)
            seconds.append(time.monotonic() - started)
            assert done.returncode == 0, done.stdout + done.stderr
            found = re.search(r"run (\S+) started", done.stdout)
            assert found, done.stdout
            ids.append(found.group(1))
        print(f"\nfour compressed runs took {', '.join(f'{s:.0f} s' for s in seconds)} "
              f"({sum(seconds):.0f} s)")
        yield Runs(project, tuple(ids), tuple(k for k, _ in RUNS), tuple(seconds))


def _trends(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "trinity"), "trends", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)


def _json(runs: Runs, output: Path, *args: str) -> dict[str, Any]:
    done = _trends(runs.project.root, runs.project.env, "--input", str(runs.logs),
                   "--output", str(output), "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def _report(runs: Runs, run_id: str, log_dir: Path, output: Path,
            env: dict[str, str] | None = None) -> str:
    """What ``trinity report`` writes for the run, its log folder as --input."""
    done = runs.project.trinity("report", "--input", str(log_dir), "--run", run_id,
                                "--output", str(output / f"{run_id}.md"), timeout=180) \
        if env is None else subprocess.run(
            [str(BIN / "trinity"), "report", "--input", str(log_dir), "--run", run_id,
             "--output", str(output / f"{run_id}.md")], env=env, capture_output=True,
            text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return (output / f"{run_id}.md").read_text(encoding="utf-8")


def _row(text: str, criterion: str) -> str:
    found = re.search(rf"\| (?:✓ PASS|✗ FAIL) \| {criterion} \| ([^|]+) \|", text)
    assert found, criterion
    return found.group(1).strip()


def assert_figures_match_report(figures: dict[str, Any], text: str) -> None:
    """A run's trends figures, printed the report's way, are the report's."""
    status = re.search(r"Status: (PASSED|FAILED)", text)
    assert status and figures["result"] == status.group(1)
    accuracy = "-" if figures["accuracy"] is None else f"{figures['accuracy']:.1%}"
    assert f"Detection accuracy: {accuracy} (" in text
    cost = figures["cost_usd"]
    assert f"Total cost: {f'${cost:,.2f}' if abs(cost) >= 1 else f'${cost:.4f}'}" in text
    conf = _row(text, "Pattern Confidence")
    assert conf.startswith(f"{figures['confidence']:.3f} average"), conf
    memory = _row(text, "Memory Stability")
    assert memory.startswith(f"peak {figures['peak_process_mb']:.0f} MB RSS"), memory
    learning = _row(text, "Learning Improvement")
    assert learning == "-" if figures["learning_in_run"] is None else learning.startswith(
        f"{figures['learning_in_run']:+.3f}"), learning


def _peak_pss(log_dir: Path, run_id: str) -> float:
    """The highest all-processes memory in the run's metrics snapshots, read as JSON."""
    values = []
    for path in (log_dir / "metrics").glob("*.json"):
        snap = json.loads(path.read_text())
        if snap.get("run_id") == run_id and isinstance(snap.get("memory_mb"), int | float):
            values.append(float(snap["memory_mb"]))
    return max(values)


def _store_confidence(root: Path) -> dict[str, tuple[float, int]]:
    """run id -> (average confidence of its detected patterns, its start), plain SQL."""
    patterns = sqlite3.connect(f"file:{root / 'trinity_patterns.db'}?mode=ro", uri=True)
    journal = sqlite3.connect(f"file:{root / 'trinity_messages.db'}?mode=ro", uri=True)
    try:
        started = dict(journal.execute("SELECT run_id, started_ms FROM runs").fetchall())
        return {run_id: (float(avg), int(started[run_id])) for run_id, avg in patterns.execute(
            "SELECT run_id, avg(confidence) FROM detections WHERE pattern IS NOT NULL"
            " GROUP BY run_id")}
    finally:
        patterns.close()
        journal.close()


@pytest.mark.timeout(900)
def test_trends_show_each_run_as_its_own_report_does(four_runs: Runs, tmp_path: Path) -> None:
    archived = sorted(p.name for p in (four_runs.logs / "archive").iterdir())
    assert archived == sorted(four_runs.run_ids[:-1])  # three archived, the latest in place
    found = _json(four_runs, tmp_path / "charts")
    by_id = {r["run_id"]: r for r in found["runs"]}
    assert list(by_id) == list(four_runs.run_ids)  # oldest first, none left out
    assert found["notes"] == []
    for run_id, kind in zip(four_runs.run_ids, four_runs.kinds, strict=True):
        figures = by_id[run_id]
        assert figures["kind"] == kind
        log_dir = four_runs.log_dir(run_id)
        assert Path(figures["log_dir"]) == log_dir
        assert_figures_match_report(figures, _report(four_runs, run_id, log_dir, tmp_path))
        assert figures["peak_memory_mb"] == pytest.approx(_peak_pss(log_dir, run_id))
        hours = 24.0 if kind == "full" else 2.0
        assert figures["simulated_h"] == hours
        assert figures["cost_per_24h_usd"] == pytest.approx(figures["cost_usd"] * 24 / hours)
        assert figures["cost_scaled_from_h"] == (None if kind == "full" else hours)


@pytest.mark.timeout(600)
def test_learning_is_the_pattern_stores_confidence_per_week(four_runs: Runs,
                                                            tmp_path: Path) -> None:
    found = _json(four_runs, tmp_path)
    stored = _store_confidence(four_runs.project.root)
    smoke = [r for r in found["runs"] if r["kind"] == "smoke"]
    for r in found["runs"]:
        assert r["confidence"] == pytest.approx(stored[r["run_id"]][0])
    for before, after in zip(smoke, smoke[1:], strict=False):
        weeks = (after["started_ms"] - before["started_ms"]) / WEEK_MS
        assert after["confidence_per_week"] == pytest.approx(
            (after["confidence"] - before["confidence"]) / weeks)
    x = [(stored[r["run_id"]][1] - stored[smoke[0]["run_id"]][1]) / WEEK_MS for r in smoke]
    y = [stored[r["run_id"]][0] for r in smoke]
    summary = next(s for s in found["summaries"] if s["kind"] == "smoke")
    assert summary["learning_per_week"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-6)
    full = next(s for s in found["summaries"] if s["kind"] == "full")
    assert full["runs"] == 1 and full["learning_per_week"] is None  # one run: no slope


@pytest.mark.timeout(600)
def test_smoke_tests_and_full_runs_are_shown_apart(four_runs: Runs, tmp_path: Path) -> None:
    full_id = four_runs.run_ids[2]
    only_full = _json(four_runs, tmp_path / "f", "--kind", "full")
    assert [r["run_id"] for r in only_full["runs"]] == [full_id]
    assert [s["kind"] for s in only_full["summaries"]] == ["full"]
    only_smoke = _json(four_runs, tmp_path / "s", "--kind", "smoke")
    assert [r["run_id"] for r in only_smoke["runs"]] == [
        i for i, k in zip(four_runs.run_ids, four_runs.kinds, strict=True) if k == "smoke"]
    both = _json(four_runs, tmp_path / "b")
    summaries = {s["kind"]: s for s in both["summaries"]}
    assert (summaries["smoke"]["runs"], summaries["full"]["runs"]) == (3, 1)
    assert summaries["smoke"]["passed"] + summaries["smoke"]["failed"] == 3
    # The text: a section per kind, each run once, in its own section, against targets.
    done = _trends(four_runs.project.root, four_runs.project.env, "--input",
                   str(four_runs.logs), "--output", str(tmp_path / "t"))
    assert done.returncode == 0, done.stderr
    smoke_part, full_part = done.stdout.split("Full runs (24 simulated hours)")
    assert full_id in full_part and full_id not in smoke_part
    for run_id in four_runs.run_ids[:2] + four_runs.run_ids[3:]:
        assert run_id in smoke_part and run_id not in full_part
    for target in ("< $5.00 per 24 h", "> 95%", "+0.10 confidence per week",
                   "< 400 MB, all processes together"):
        assert target in done.stdout
    assert "(scaled from 2 h)" in smoke_part and "(scaled from" not in full_part


@pytest.mark.timeout(600)
def test_charts_and_html_are_written(four_runs: Runs, tmp_path: Path) -> None:
    found = _json(four_runs, tmp_path)
    files = [Path(p) for p in found["files"]]
    pngs = [p for p in files if p.suffix == ".png"]
    assert sorted(p.name for p in pngs) == sorted(
        f"trends_{kind}_{key}.png" for kind in ("smoke", "full")
        for key in ("cost", "accuracy", "learning", "memory"))
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        height, width = imread(png).shape[:2]
        assert (width, height) == (900, 400)
    page = (tmp_path / "trends.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 8
    for run_id in four_runs.run_ids:
        assert run_id in page


# -- bad input: one line on stderr, never a traceback ------------------------------------

def _copy(runs: Runs, dest: Path) -> tuple[Path, dict[str, str]]:
    """The project's stores and logs (not its sockets) in ``dest``, and its environment."""
    shutil.copytree(runs.project.root, dest, ignore=shutil.ignore_patterns(
        ".run", "supervisor", "*.sock"))
    env = {**runs.project.env, "TRINITY_DATA_DIR": str(dest)}
    return dest, env


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.timeout(600)
def test_a_torn_archived_run_is_left_out_with_a_note(four_runs: Runs, tmp_path: Path) -> None:
    root, env = _copy(four_runs, tmp_path / "p")
    first, second = four_runs.run_ids[:2]
    # The first archive folder, renamed and its config torn: nothing says whose it is.
    torn = root / "logs" / "archive" / first
    (torn / "test_config.json").write_text('{"run_id": "2026', encoding="utf-8")
    torn.rename(torn.with_name("unknown"))
    # The second: a torn snapshot; its report lists a data gap, and so do the trends.
    snapshot = sorted((root / "logs" / "archive" / second / "metrics").glob("*.json"))[-1]
    snapshot.write_text('{"elapsed_ho', encoding="utf-8")
    done = _trends(root, env, "--input", str(root / "logs"), "--output", str(tmp_path / "o"),
                   "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert [r["run_id"] for r in found["runs"]] == list(four_runs.run_ids[1:])
    notes = found["notes"]
    assert any(n.startswith("archive/unknown: test_config.json missing or unreadable")
               for n in notes), notes
    assert any(n.startswith(f"run {first}: no log folder") for n in notes), notes
    gap = f"run {second}: {{}} data gaps, as in its report (first: metrics/{snapshot.name}: "
    figures = next(r for r in found["runs"] if r["run_id"] == second)
    assert figures["data_gaps"] >= 1
    assert any(n.startswith(gap.format(figures["data_gaps"])) for n in notes), notes
    text = _report(four_runs, second, root / "logs" / "archive" / second, tmp_path, env)
    assert_figures_match_report(figures, text)
    # The text says the same, one line a note.
    plain = _trends(root, env, "--input", str(root / "logs"), "--output", str(tmp_path / "o"))
    assert plain.returncode == 0 and "Traceback" not in plain.stderr
    assert sum(line.startswith("note: ") for line in plain.stdout.splitlines()) == len(notes)


@pytest.mark.timeout(600)
def test_nothing_readable_is_one_line(four_runs: Runs, tmp_path: Path) -> None:
    root, env = _copy(four_runs, tmp_path / "p")
    logs = root / "logs"
    for config in [*logs.glob("archive/*/test_config.json"), logs / "24h_test" /
                   "test_config.json"]:
        config.write_text("{", encoding="utf-8")
    for folder in (logs / "archive").iterdir():
        folder.rename(folder.with_name(f"x-{folder.name}"))
    shutil.rmtree(logs / "24h_test")
    line = _one_line_error(_trends(root, env, "--input", str(logs)))
    assert line.startswith(f"Error: no readable run in {logs}"), line


@pytest.mark.timeout(300)
def test_missing_and_wrong_folders_are_one_line(four_runs: Runs, tmp_path: Path) -> None:
    root, env = four_runs.project.root, four_runs.project.env
    line = _one_line_error(_trends(root, env, "--input", str(tmp_path / "missing")))
    assert line == f"Error: log folder {tmp_path / 'missing'} does not exist"
    line = _one_line_error(_trends(root, env, "--input", str(tmp_path)))
    assert line == f"Error: {tmp_path} holds no run logs (neither 24h_test/ nor archive/)"
    (tmp_path / "file").write_text("x")
    line = _one_line_error(_trends(root, env, "--input", str(four_runs.logs), "--output",
                                   str(tmp_path / "file")))
    assert "is a file" in line or "Error" in line
