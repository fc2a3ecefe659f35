"""``trinity schedule`` (units and cron lines parsed back, ``--install`` into a folder),
``trinity trends``' one-line errors where there are no runs to read, and the figures
across runs computed from given runs (the real runs' trends: tests/system/test_trends.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.conftest import BIN, ROOT
from trinity.cli import main
from trinity.controller.ops import schedule as cadence
from trinity.controller.reports import trends

WEEK_MS = 7 * 24 * 3600 * 1000


@pytest.fixture
def project() -> Iterator[Path]:
    """A Trinity project folder: the repo's supervisord config in an empty folder."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="tsc"))
    shutil.copy(ROOT / "supervisor.conf", root / "supervisor.conf")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def invoke(args: list[str], data_dir: Path | None = None) -> Result:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRINITY_")}
    if data_dir is not None:
        env["TRINITY_DATA_DIR"] = str(data_dir)
    return CliRunner().invoke(main, args, env=env, prog_name="trinity")


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """section -> its (key, value) lines, in order (a key may repeat, as systemd allows)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        assert current is not None, line
        key, _, value = line.partition("=")
        sections[current].append((key, value))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit[section] if k == key]


def printed_units(output: str) -> tuple[dict[str, str], list[str]]:
    """``trinity schedule``'s output split into unit files and cron lines."""
    units: dict[str, str] = {}
    cron: list[str] = []
    name = None
    for line in output.splitlines(keepends=True):
        if line.startswith("# crontab"):
            name = None
            continue
        if line.startswith("# trinity-"):
            name = line[2:].strip()
            units[name] = ""
        elif name is not None:
            units[name] += line
        elif line.strip():
            cron.append(line.rstrip("\n"))
    return {n: t.rstrip("\n") + "\n" for n, t in units.items()}, cron


# -- trinity schedule ----------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "hours", "calendar"),
                         [("smoke", "2", "Mon *-*-* 03:00:00"),
                          ("full", "24", "*-*-01 06:00:00")])
def test_schedule_prints_a_timer_and_a_service_per_cadence(project: Path, kind: str,
                                                           hours: str, calendar: str) -> None:
    result = invoke(["schedule", "--project", str(project)])
    assert result.exit_code == 0, result.output
    units, _ = printed_units(result.stdout)
    assert sorted(units) == sorted(f"trinity-{k}.{t}" for k in ("smoke", "full")
                                   for t in ("service", "timer"))
    service = parse_unit(units[f"trinity-{kind}.service"])
    trinity = str(BIN / "trinity")
    assert values(service, "Service", "Type") == ["oneshot"]
    assert values(service, "Service", "WorkingDirectory") == [str(project.resolve())]
    assert f"TRINITY_DATA_DIR={project.resolve()}" in values(service, "Service", "Environment")
    path_env = next(v for v in values(service, "Service", "Environment")
                    if v.startswith("PATH="))
    assert path_env.split("=", 1)[1].split(":")[0] == str(BIN)  # supervisord's programs
    assert values(service, "Service", "ExecStart") == [f"{trinity} run --duration {hours}"]
    logs = project.resolve() / "logs"
    assert values(service, "Service", "ExecStopPost") == [
        f"-{trinity} report --input {logs / '24h_test'}",
        f"-{trinity} trends --input {logs} --output {project.resolve() / 'reports/trends'}"]
    assert values(service, "Service", "TimeoutStartSec") == ["infinity"]
    timer = parse_unit(units[f"trinity-{kind}.timer"])
    assert values(timer, "Timer", "OnCalendar") == [calendar]
    assert values(timer, "Timer", "Persistent") == ["true"]
    assert values(timer, "Timer", "Unit") == [f"trinity-{kind}.service"]
    assert values(timer, "Install", "WantedBy") == ["timers.target"]


def test_schedule_cron_lines_run_in_the_project_and_parse(project: Path) -> None:
    result = invoke(["schedule", "--project", str(project)])
    assert result.exit_code == 0, result.output
    _, cron = printed_units(result.stdout)
    assert len(cron) == 2
    expected = {"2": ("0", "3", "*", "*", "1"), "24": ("0", "6", "1", "*", "*")}
    for line in cron:
        fields = line.split(None, 5)
        command = fields[5]
        hours = re.search(r"trinity run --duration (\d+);", command)
        assert hours, command
        assert tuple(fields[:5]) == expected[hours.group(1)]
        assert command.startswith(f"cd {project.resolve()} && export PATH={BIN}:")
        assert f"TRINITY_DATA_DIR={project.resolve()}" in command
        assert f"trends --input {project.resolve() / 'logs'} --output" in command
        assert "%" not in command.replace("\\%", "")  # cron would cut the line there
        # The command is valid sh (parsed, not run).
        checked = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_cron_line_escapes_percent_and_quotes_paths(tmp_path: Path) -> None:
    folder = tmp_path / "my 100% project"
    folder.mkdir()
    shutil.copy(ROOT / "supervisor.conf", folder / "supervisor.conf")
    made = cadence.make_schedule(folder, Path("/opt/tr/bin/trinity"))
    line = made.cron_lines[0]
    assert "my 100\\% project" in line and "'" in line  # quoted for sh, % escaped for cron
    service = parse_unit(made.units["trinity-smoke.service"])
    assert values(service, "Service", "WorkingDirectory") == [str(folder).replace("%", "%%")]
    assert values(service, "Service", "ExecStart") == ["/opt/tr/bin/trinity run --duration 2"]
    assert f'"TRINITY_DATA_DIR={str(folder).replace("%", "%%")}"' in values(
        service, "Service", "Environment")


def test_schedule_calendars_are_valid_for_systemd() -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is needed to check the timers' calendars")
        pytest.skip("no systemd-analyze on this machine")
    for c in cadence.CADENCES:
        checked = subprocess.run(["systemd-analyze", "calendar", c.on_calendar],
                                 capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        assert "Normalized form: " + c.on_calendar in checked.stdout


def test_install_writes_the_units_and_prints_how_to_enable(project: Path,
                                                          tmp_path: Path) -> None:
    printed = invoke(["schedule", "--project", str(project)])
    units, _ = printed_units(printed.stdout)
    unit_dir = tmp_path / "units"
    result = invoke(["schedule", "--project", str(project), "--install",
                     "--unit-dir", str(unit_dir)])
    assert result.exit_code == 0, result.output
    written = {p.name: p.read_text(encoding="utf-8") for p in unit_dir.iterdir()}
    assert written == units
    for name in written:
        assert f"wrote {unit_dir / name}" in result.stdout
    assert ("systemctl --user daemon-reload && systemctl --user enable --now "
            "trinity-smoke.timer trinity-full.timer") in result.stdout
    assert "not enabled (the units are not in the user manager's folder)" in result.stdout


def test_installed_units_verify(project: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is needed to verify the units")
        pytest.skip("no systemd-analyze on this machine")
    unit_dir = tmp_path / "units"
    cadence.install(cadence.make_schedule(project), unit_dir)
    checked = subprocess.run(["systemd-analyze", "verify",
                              *sorted(str(p) for p in unit_dir.iterdir())],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def test_schedule_of_a_missing_or_foreign_folder_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(invoke(["schedule", "--project", str(tmp_path / "gone")]))
    assert line == f"Error: project folder {tmp_path / 'gone'} does not exist"
    line = one_line_error(invoke(["schedule", "--project", str(tmp_path)]))
    assert line == (f"Error: {tmp_path} is not a Trinity project (no supervisor.conf "
                    "declaring the controller program)")
    (tmp_path / "supervisor.conf").write_text("[program:web\ncommand=x\n")
    line = one_line_error(invoke(["schedule", "--project", str(tmp_path), "--install",
                                  "--unit-dir", str(tmp_path / "u")]))
    assert line.startswith(f"Error: {tmp_path / 'supervisor.conf'} is not a supervisord "
                           "config"), line
    assert not (tmp_path / "u").exists()


# -- trinity trends: nothing to read -------------------------------------------------------

def test_trends_of_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(invoke(["trends", "--input", str(tmp_path / "logs")], tmp_path))
    assert line == f"Error: log folder {tmp_path / 'logs'} does not exist"


def test_trends_of_a_folder_without_run_logs_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(invoke(["trends", "--input", str(tmp_path)], tmp_path))
    assert line == f"Error: {tmp_path} holds no run logs (neither 24h_test/ nor archive/)"


def test_trends_without_a_journal_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "logs" / "archive").mkdir(parents=True)
    line = one_line_error(invoke(["trends"], tmp_path))
    assert line.startswith(f"Error: no journal at {tmp_path / 'trinity_messages.db'}"), line


# -- the figures across runs ---------------------------------------------------------------

def figures(run_id: str, started_ms: int, confidence: float | None,
            kind: trends.Kind = "smoke") -> trends.RunFigures:
    return trends.RunFigures(
        run_id=run_id, kind=kind, started_ms=started_ms, run_status="completed",
        result="PASSED", failed_criteria=(), duration_h=2.0, simulated_h=2.0, time_scale=1.0,
        log_dir="", cost_usd=0.1, cost_per_24h_usd=1.2, cost_scaled_from_h=2.0,
        accuracy=0.96, events_classified=4, confidence=confidence, learning_in_run=None,
        peak_memory_mb=300.0, peak_process_mb=180.0, data_gaps=0)


@pytest.mark.parametrize(("hours", "kind"), [(2.0, "smoke"), (23.5, "smoke"), (24.0, "full"),
                                             (48.0, "full")])
def test_runs_are_told_apart_by_their_duration(hours: float, kind: str) -> None:
    assert trends.kind_of(hours) == kind


def test_learning_per_week_is_the_slope_of_confidence_over_weeks() -> None:
    runs = [figures("a", 0, 0.70), figures("b", WEEK_MS, 0.80), figures("c", 2 * WEEK_MS, 0.90)]
    assert trends.learning_per_week(runs) == pytest.approx(0.10)
    assert trends.LEARNING_RATE.met(trends.learning_per_week(runs))
    slower = [figures("a", 0, 0.70), figures("b", 2 * WEEK_MS, 0.80)]
    assert trends.learning_per_week(slower) == pytest.approx(0.05)
    assert not trends.LEARNING_RATE.met(trends.learning_per_week(slower))
    assert trends.learning_per_week([figures("a", 0, 0.7), figures("b", WEEK_MS, None)]) is None


def test_each_run_is_compared_with_the_previous_run_of_its_kind() -> None:
    found = trends._with_changes([
        figures("a", 0, 0.70), figures("f", WEEK_MS, 0.50, "full"),
        figures("b", 2 * WEEK_MS, None), figures("c", 4 * WEEK_MS, 0.90)])
    by_id = {r.run_id: r for r in found}
    assert by_id["a"].confidence_change is None and by_id["f"].confidence_change is None
    assert by_id["b"].confidence_change is None  # no confidence to compare
    assert by_id["c"].confidence_change == pytest.approx(0.20)  # against a, 4 weeks back
    assert by_id["c"].confidence_per_week == pytest.approx(0.05)
    summary = trends.summarize("smoke", found)
    assert (summary.runs, summary.passed, summary.failed) == (3, 3, 0)
    assert summary.span_days == pytest.approx(28.0)
    assert summary.latest is not None and summary.latest.run_id == "c"


def test_trends_of_one_runs_log_folder_names_its_parent(tmp_path: Path) -> None:
    run_folder = tmp_path / "logs" / "24h_test"
    run_folder.mkdir(parents=True)
    (run_folder / "test_config.json").write_text("{}")
    line = one_line_error(invoke(["trends", "--input", str(run_folder)], tmp_path))
    assert line == (f"Error: {run_folder} is one run's log folder; pass the folder holding it "
                    f"and archive/ ({tmp_path / 'logs'})")


def test_a_run_without_a_duration_is_left_out_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    from trinity.stores import runs

    (tmp_path / "logs" / "archive").mkdir(parents=True)
    conn = sqlite3.connect(tmp_path / "trinity_messages.db", isolation_level=None)
    try:
        run = runs.create_run(conn, {"time_scale": 1.0})
    finally:
        conn.close()
    line = one_line_error(invoke(["trends"], tmp_path))
    assert line == (f"Error: no readable run in {tmp_path / 'logs'} (run {run.run_id}: its "
                    "configuration in the journal has no valid duration_h or time_scale; "
                    "left out)")


@pytest.mark.parametrize(("status", "sim_s", "hours"),
                         [("completed", 7064.8, 2.0), ("timed_out", 7100.0, 2.0),
                          ("stopped", 3600.0, 1.0), ("active", 9000.0, 2.0)])
def test_a_finished_run_covered_its_duration_a_stopped_one_its_checkpoint(
        status: str, sim_s: float, hours: float) -> None:
    """A run is not checkpointed as it finishes: its last checkpoint may fall short."""
    from trinity.stores import runs

    run = runs.Run("r", 0, status, {"duration_h": 2, "time_scale": 2880}, sim_s)
    assert trends._covered_h(run) == hours
