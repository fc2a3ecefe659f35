"""The ``trinity`` command line: help, settings errors, status and dead letters on no run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from trinity.bus.journal import Journal
from trinity.cli import main

COMMANDS = main.list_commands(click.Context(main))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tr"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(data_dir: Path, **extra: str) -> dict[str, str | None]:
    """The environment for one invocation: no inherited TRINITY_* variable leaks in."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRINITY_")}
    env["TRINITY_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def invoke(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, prog_name="trinity", catch_exceptions=False)


# -- help ------------------------------------------------------------------------

def test_top_level_help_lists_every_command() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: trinity [OPTIONS] COMMAND [ARGS]...")
    for name in COMMANDS:
        assert f"  {name} " in result.output, f"{name} missing from --help"


def test_no_arguments_prints_usage() -> None:
    result = invoke([])
    assert "Usage: trinity" in result.output
    assert result.exit_code in (0, 2)  # click >= 8.2 exits 2 for a group without a command


def test_there_are_commands() -> None:
    assert {"agent", "controller", "run", "stop", "status", "dead-letters", "dashboard",
            "export", "report"} <= set(COMMANDS)


def test_the_report_s_plotting_library_loads_only_for_the_commands_that_need_it(
        tmp_path: Path) -> None:
    def loads_matplotlib(*args: str) -> bool:
        code = ("import sys\nfrom trinity.cli import main\ntry:\n"
                f"    main({list(args)!r}, standalone_mode=False)\n"
                "except Exception:\n    pass\nprint('matplotlib' in sys.modules)")
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=60, env={**os.environ, "TRINITY_DATA_DIR": str(tmp_path)})
        assert found.returncode == 0, found.stderr
        return found.stdout.splitlines()[-1] == "True"

    assert not loads_matplotlib("status", "--help")
    assert not loads_matplotlib("report", "--help")  # listing a command imports no report
    assert loads_matplotlib("report", "--input", str(tmp_path))


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name: str) -> None:
    result = invoke([name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: trinity {name}")
    command = main.get_command(click.Context(main), name)
    assert command is not None
    assert command.help, f"{name} has no help text"
    assert command.get_short_help_str(limit=200).rstrip(".")[:30] in " ".join(result.output.split())
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.opts[-1] in result.output, f"{name} --help does not show {param.opts}"


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert version("trinity") in result.output


def test_unknown_command_fails_with_usage() -> None:
    result = invoke(["no-such-command"])
    assert result.exit_code == 2
    assert "No such command 'no-such-command'" in result.output


# -- invalid settings: a clear error naming the variable, before anything starts ---

INVALID_RUNS = [
    ({"TRINITY_TIME_SCALE": "abc"}, [], "TRINITY_TIME_SCALE='abc' is not a number"),
    ({"TRINITY_TEST_DURATION": "24h"}, [], "TRINITY_TEST_DURATION"),
    ({"TRINITY_EVENT_INTERVAL": "-5"}, [], "TRINITY_EVENT_INTERVAL"),
    ({"TRINITY_HEARTBEAT_INTERVAL": "0"}, [], "TRINITY_HEARTBEAT_INTERVAL"),
    ({"TRINITY_HEARTBEAT_MAX_MISSED": "1.5"}, [], "TRINITY_HEARTBEAT_MAX_MISSED"),
    ({"TRINITY_MAX_PAYLOAD_BYTES": "12"}, [], "TRINITY_MAX_PAYLOAD_BYTES"),
    ({"TRINITY_RUN_DIR": "/tmp/" + "r" * 120}, [], "TRINITY_RUN_DIR"),
    ({}, ["--time-scale", "0"], "time_scale (TRINITY_TIME_SCALE) must be"),
    ({}, ["--duration", "-1"], "duration_h (TRINITY_TEST_DURATION) must be"),
    ({}, ["--event-interval", "0"], "event_interval_min (TRINITY_EVENT_INTERVAL) must be"),
    ({"TRINITY_TIME_SCALE": "0"}, ["--resume", "--detach"], "TRINITY_TIME_SCALE"),
    ({"TRINITY_TEST_BUDGET": "lots"}, [], "TRINITY_TEST_BUDGET"),
    ({}, ["--budget", "-5"], "budget_usd (TRINITY_TEST_BUDGET) must be"),
    ({"TRINITY_BUDGET_MODE": "strict"}, [], "TRINITY_BUDGET_MODE"),
]


@pytest.mark.parametrize(("env", "args", "expected"), INVALID_RUNS)
def test_run_with_an_invalid_setting_fails_before_starting(
    data_dir: Path, env: dict[str, str], args: list[str], expected: str
) -> None:
    # A config that does not exist: had settings not been checked first, the error
    # would be about the config (exit 1) instead of the setting (usage error, exit 2).
    config = data_dir / "no-such-supervisor.conf"
    result = invoke(["run", "--config", str(config), *args], env=_env(data_dir, **env))
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output
    assert expected in result.output
    assert "supervisor config" not in result.output
    assert list(data_dir.iterdir()) == [], "something was created before the settings check"


def test_a_flag_that_is_not_a_number_is_rejected_by_click(data_dir: Path) -> None:
    config = data_dir / "no-such-supervisor.conf"
    result = invoke(["run", "--config", str(config), "--time-scale", "fast"], env=_env(data_dir))
    assert result.exit_code == 2
    assert "Invalid value for '--time-scale'" in result.output
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("args", [["status"], ["dead-letters"]])
def test_read_only_commands_reject_invalid_settings_too(data_dir: Path, args: list[str]) -> None:
    result = invoke(args, env=_env(data_dir, TRINITY_TIME_SCALE="abc"))
    assert result.exit_code == 2
    assert "TRINITY_TIME_SCALE" in result.output


@pytest.mark.parametrize("args", [["agent", "witness"], ["controller"], ["crashwatch"]])
def test_process_commands_reject_invalid_settings_before_starting(
    data_dir: Path, args: list[str]
) -> None:
    # In a child process: these commands configure the root logger.
    env = {k: v for k, v in _env(data_dir, TRINITY_TIME_SCALE="abc").items() if v is not None}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}, **env}
    proc = subprocess.run(
        [sys.executable, "-m", "trinity.cli", *args], env=env, cwd=data_dir,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "TRINITY_TIME_SCALE='abc' is not a number" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (data_dir / "trinity_messages.db").exists()
    assert not (data_dir / ".run").exists()


def test_agent_rejects_an_unknown_name() -> None:
    result = invoke(["agent", "oracle"])
    assert result.exit_code == 2
    assert "Invalid value for '{witness|architect|executor}'" in result.output


# -- status and dead letters when there is no run ------------------------------------

def test_status_on_an_empty_data_dir_says_there_is_no_run(data_dir: Path) -> None:
    config = data_dir / "no-such-supervisor.conf"
    result = invoke(["status", "--config", str(config)], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    assert "no run recorded yet" in result.output
    assert "supervisord:" in result.output
    assert not (data_dir / "trinity_messages.db").exists(), "status must not create a journal"


def test_status_json_on_an_empty_data_dir(data_dir: Path) -> None:
    config = data_dir / "no-such-supervisor.conf"
    result = invoke(["status", "--json", "--config", str(config)], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["run"] is None
    assert report["data_dir"] == str(data_dir)
    assert report["supervisord"] != "running"
    assert "controller" not in report  # no controller has run here


def test_status_reports_a_controller_loop_that_stopped_as_not_alive(data_dir: Path) -> None:
    """The alive file of a controller that no longer runs: its age, and not alive."""
    from trinity.controller.supervision.watchdog import alive_path
    from trinity.settings import Settings

    path = alive_path(Settings.from_env({"TRINITY_DATA_DIR": str(data_dir)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path, (time.time() - 95, time.time() - 95))
    config = data_dir / "no-such-supervisor.conf"
    result = invoke(["status", "--json", "--config", str(config)], env=_env(data_dir))
    report = json.loads(result.stdout)
    assert report["controller"]["alive"] is False
    assert 94 <= report["controller"]["loop_age_s"] < 100


def test_status_with_the_default_config_in_an_empty_folder(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(data_dir)  # no supervisor.conf here
    result = invoke(["status"], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    assert "no run recorded yet" in result.output


def test_dead_letters_on_an_empty_data_dir_says_there_is_no_journal(data_dir: Path) -> None:
    result = invoke(["dead-letters"], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"no journal at {data_dir / 'trinity_messages.db'}"
    assert not (data_dir / "trinity_messages.db").exists()


def test_dead_letters_on_an_empty_journal_says_there_are_none(data_dir: Path) -> None:
    Journal(data_dir / "trinity_messages.db", source="test").close()
    result = invoke(["dead-letters"], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no dead letters"


def test_dead_letters_lists_reasons_newest_first(data_dir: Path) -> None:
    journal = Journal(data_dir / "trinity_messages.db", source="test")
    try:
        with journal.transaction() as tx:
            tx.dead_letter("witness", "expected 3 frames [topic, envelope, payload], got 1", b"x")
            tx.dead_letter("executor", "missing field 'task_id'", b"{}",
                           stream="execution_queue", msg_id="execution_queue/t1")
    finally:
        journal.close()
    result = invoke(["dead-letters"], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    assert "executor" in lines[0] and "execution_queue" in lines[0]
    assert lines[0].endswith("missing field 'task_id'")
    assert "witness" in lines[1] and lines[1].endswith("got 1")
    newest = invoke(["dead-letters", "--limit", "1"], env=_env(data_dir))
    assert newest.output.strip().splitlines() == lines[:1]


def test_stop_with_a_missing_config_is_a_clear_error(data_dir: Path) -> None:
    config = data_dir / "no-such-supervisor.conf"
    result = invoke(["stop", "--config", str(config)], env=_env(data_dir))
    assert result.exit_code == 1
    assert "Error:" in result.output and "does not exist" in result.output


# -- costs ------------------------------------------------------------------------

def test_costs_without_a_ledger_says_so(data_dir: Path) -> None:
    result = invoke(["costs"], env=_env(data_dir))
    assert result.exit_code == 1
    assert "no cost ledger" in result.output


def test_costs_totals_come_from_the_ledger_rows(data_dir: Path) -> None:
    from trinity.stores.costs import CallRecord, CostLedger

    ledger = CostLedger(data_dir / "trinity_costs.db")
    rows = [("architect", "embedded", True, 0.0, "success", "r1"),
            ("executor", "cloud", False, 0.0125, "success", "r2"),
            ("executor", "cloud", False, 0.0, "timeout", "r3"),
            ("executor", "embedded", True, 0.0, "success", "r3")]
    for i, (agent, provider, local, cost, status, request) in enumerate(rows):
        ledger.record(CallRecord(
            call_id=f"c{i}", request_id=request, attempt=1, route="primary", ts_ms=i,
            sim_elapsed_s=None, run_id="run-a", agent=agent, provider=provider,
            provider_kind="openai" if provider == "cloud" else "embedded",
            model="gpt-5" if provider == "cloud" else "SmolLM2-135M-Instruct", local=local,
            input_tokens=100, output_tokens=10, cached_tokens=0, reasoning_tokens=0,
            tokens_estimated=False, cost_usd=cost, latency_ms=5.0, status=status,
            error_class=None if status == "success" else "timeout", error=None,
            event_id="e", task_id=None))
    ledger.close()
    result = invoke(["costs", "--run", "run-a", "--json"], env=_env(data_dir))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["total_calls"] == 4 and report["requests"] == 3
    assert report["total_cost_usd"] == 0.0125
    assert report["success_rate"] == 0.75
    assert report["local_share_calls"] == 0.5
    assert report["by_agent"]["executor"]["calls"] == 3
    assert report["by_provider"]["cloud"]["cost_usd"] == 0.0125
    assert report["by_status"] == {"success": 3, "error": 0, "timeout": 1}
    text = invoke(["costs", "--run", "run-a"], env=_env(data_dir))
    assert "4 attempts for 3 requests, $0.0125, success rate 75.0%" in text.output
    other = json.loads(invoke(["costs", "--run", "run-b", "--json"], env=_env(data_dir)).output)
    assert other["total_calls"] == 0 and other["success_rate"] is None


def test_witness_eval_passes_its_options_to_the_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trinity.agents.witness import evaluate

    seen: list[tuple[int, int, int, bool]] = []
    printed: list[dict[str, bool]] = []
    passed = [False]

    def fake_evaluate(folds: int, seed: int, repeats: int, *,
                      holdout: bool) -> evaluate.Evaluation:
        seen.append((folds, seed, repeats, holdout))
        return evaluate.Evaluation({"n": 0}, {}, None, passed[0], 1.0)

    def fake_print(result: evaluate.Evaluation, *, errors: bool, holdout_errors: bool) -> None:
        printed.append({"errors": errors, "holdout_errors": holdout_errors})

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(evaluate, "print_results", fake_print)
    runner = CliRunner()
    result = runner.invoke(main, ["witness", "eval"])
    assert result.exit_code == 1  # the evaluation's verdict is the command's exit status
    assert seen[-1] == (5, 0, 5, True)
    assert printed[-1] == {"errors": False, "holdout_errors": False}
    passed[0] = True
    result = runner.invoke(main, ["witness", "eval", "--folds", "3", "--seed", "2",
                                  "--repeats", "1", "--errors", "--no-holdout", "--json"])
    assert result.exit_code == 0
    assert seen[-1] == (3, 2, 1, False)
    assert json.loads(result.output)["passed"] is True and len(printed) == 1
    bad = runner.invoke(main, ["witness", "eval", "--repeats", "0"])
    assert bad.exit_code == 2 and len(seen) == 2
