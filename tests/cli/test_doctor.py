"""``trinity doctor``: a fresh project passes with no key and no server; each way a run
would fail is a FAIL line that names its fix, produced by the real thing (a missing
file, a refusing port, a server without the model, a bound socket, a broken config).

The real completion runs once, in the session's fresh-project run of the installed
``trinity`` script; every other test skips it (``--skip completion``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.agents.models.servers import OLLAMA_MODEL, OllamaWireServer, RefusingPort
from tests.conftest import wait_for
from tests.firestore_emulator import FirestoreEmulator
from trinity.bus.journal import Journal
from trinity.cli import main
from trinity.cli.doctor import ORDER
from trinity.controller.supervision.supervisord import Supervisor
from trinity.stores import runs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# What a machine with no key and no model server has none of.
SERVER_AND_KEY_VARIABLES = ("OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                            "FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT",
                            "GOOGLE_APPLICATION_CREDENTIALS")


def _fresh_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRINITY_") and k not in SERVER_AND_KEY_VARIABLES}
    env["TRINITY_DATA_DIR"] = str(root)
    # Every other test run on this machine may hold the default port 9464; the port
    # check itself is tested below with a socket of its own.
    env["TRINITY_METRICS_PORT"] = "0"
    return env


def _fresh_project() -> Path:
    root = Path(tempfile.mkdtemp(prefix="trdoc", dir="/tmp"))
    shutil.copy(ROOT / "supervisor.conf", root / "supervisor.conf")
    return root


@dataclass(frozen=True)
class Run:
    code: int
    checks: list[dict[str, str]]
    wall_s: float
    stderr: str

    def check(self, name: str) -> dict[str, str]:
        return next(c for c in self.checks if c["name"] == name)


@pytest.fixture(scope="session")
def fresh_run() -> Iterator[Run]:
    """``trinity doctor --json`` by the installed script, in a fresh project folder with
    no key and no server: every check, the real completion included."""
    root = _fresh_project()
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "trinity"), "doctor", "--json"], cwd=root,
                          env=_fresh_env(root), capture_output=True, text=True, timeout=120)
    wall_s = time.perf_counter() - started
    try:
        checks = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON: {done.stdout!r} {done.stderr!r}")
    yield Run(done.returncode, checks, wall_s, done.stderr)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def project() -> Iterator[Path]:
    root = _fresh_project()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def doctor(root: Path, *args: str, completion: bool = False, **env: str) -> Result:
    """``trinity doctor`` in process, in ``root``'s fresh environment plus ``env``."""
    unset: dict[str, str | None] = {k: None for k in os.environ
                                    if k.startswith("TRINITY_") or k in SERVER_AND_KEY_VARIABLES}
    skip = [] if completion else ["--skip", "completion"]
    return CliRunner().invoke(
        main, ["doctor", "--config", str(root / "supervisor.conf"), *skip, *args],
        env={**unset, **_fresh_env(root), **env}, prog_name="trinity",
        catch_exceptions=False)


def line(result: Result, name: str) -> str:
    """The output line of check ``name``, its runs of spaces (column padding) as one."""
    found = [text for text in result.output.splitlines() if text.split()[1:2] == [name]]
    assert len(found) == 1, result.output
    return " ".join(found[0].split())


def routing_file(root: Path, text: str) -> str:
    path = root / "routing.toml"
    path.write_text(text)
    return str(path)


# -- a fresh project: passes with no key and no server --------------------------------

def test_a_fresh_project_passes_with_no_key_and_no_server(fresh_run: Run) -> None:
    assert fresh_run.code == 0, fresh_run.checks
    assert fresh_run.stderr == ""
    assert all(c["status"] in ("PASS", "WARN") for c in fresh_run.checks), fresh_run.checks
    assert {c["name"].split(":")[0] for c in fresh_run.checks} == set(ORDER)
    assert fresh_run.check("completion")["status"] == "PASS"
    assert '"ready"' in fresh_run.check("completion")["detail"]
    # Unconfigured providers are a note, not a failure: the embedded model needs nothing.
    for name in ("provider:ollama", "provider:cloud"):
        assert fresh_run.check(name)["status"] == "PASS"
        assert "not configured" in fresh_run.check(name)["detail"]
    assert "OPENAI_API_KEY not set" in fresh_run.check("keys")["detail"]
    assert fresh_run.check("stores")["detail"].startswith("clean slate")


def test_json_lists_name_status_detail_and_fix(fresh_run: Run) -> None:
    for check in fresh_run.checks:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["detail"]
        assert bool(check["fix"]) == (check["status"] != "PASS"), check


def test_the_fresh_run_takes_seconds(fresh_run: Run) -> None:
    assert fresh_run.wall_s < 30, f"trinity doctor took {fresh_run.wall_s:.1f} s"


def test_each_check_prints_one_line_and_a_summary(project: Path) -> None:
    result = doctor(project)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(text.split()[0] in ("PASS", "WARN") for text in lines[:-1]), result.output
    names = [text.split()[1].split(":")[0] for text in lines[:-1]]
    assert names == sorted(names, key=ORDER.index)  # the checklist's order
    assert "completion" not in names
    assert lines[-1].endswith("0 FAIL")


# -- the model calls ---------------------------------------------------------------------

def test_a_missing_model_file_fails_and_names_the_setting_to_fix(project: Path) -> None:
    missing = project / "no-such-model.gguf"
    routing = routing_file(project, f'[providers.embedded]\nkind = "embedded"\n'
                                    f'model_path = "{missing}"\n[[routes]]\nchain = ["embedded"]\n')
    result = doctor(project, completion=True, TRINITY_ROUTING=routing)
    assert result.exit_code == 1
    text = line(result, "model-file")
    assert text.startswith("FAIL") and str(missing) in text
    assert "-> correct providers.embedded.model_path in" in text
    assert line(result, "completion").startswith("FAIL")  # not tried without its file
    assert line(result, "routing").startswith("FAIL")  # no route has a usable provider


def test_a_file_that_is_not_a_model_fails(project: Path) -> None:
    fake = project / "model.gguf"
    fake.write_bytes(b"<html>not found</html>")
    routing = routing_file(project, f'[providers.embedded]\nkind = "embedded"\n'
                                    f'model_path = "{fake}"\n[[routes]]\nchain = ["embedded"]\n')
    text = line(doctor(project, TRINITY_ROUTING=routing), "model-file")
    assert text.startswith("FAIL") and "is not a GGUF file" in text


@pytest.fixture
def refusing() -> Iterator[RefusingPort]:
    """An address that refuses connections for the whole test."""
    port = RefusingPort()
    yield port
    port.close()


@pytest.fixture(scope="module")
def ollama_server() -> Iterator[OllamaWireServer]:
    server = OllamaWireServer().start()
    yield server
    server.stop()


def test_an_unreachable_ollama_fails_and_says_start_it(project: Path,
                                                       refusing: RefusingPort) -> None:
    result = doctor(project, OLLAMA_HOST=refusing.url)
    assert result.exit_code == 1
    text = line(result, "provider:ollama")
    assert text.startswith("FAIL") and f"Ollama at {refusing.url} not reachable" in text
    assert "-> start Ollama (`ollama serve`) or correct OLLAMA_HOST" in text


def test_a_model_not_pulled_fails_and_says_pull_it(project: Path,
                                                    ollama_server: OllamaWireServer) -> None:
    # The shipped policy asks Ollama for qwen2.5-coder:1.5b; this server has smollm2 only.
    result = doctor(project, OLLAMA_HOST=ollama_server.url)
    assert result.exit_code == 1
    text = line(result, "provider:ollama")
    assert text.startswith("FAIL")
    assert f"does not have qwen2.5-coder:1.5b (it has {OLLAMA_MODEL})" in text
    assert "-> `ollama pull qwen2.5-coder:1.5b`" in text


def test_an_ollama_with_the_model_passes(project: Path, ollama_server: OllamaWireServer) -> None:
    routing = routing_file(project, '[providers.ollama]\nkind = "ollama"\n'
                                    f'model = "{OLLAMA_MODEL}"\nhost_env = "OLLAMA_HOST"\n'
                                    '[[routes]]\nchain = ["ollama"]\n')
    result = doctor(project, TRINITY_ROUTING=routing, OLLAMA_HOST=ollama_server.url)
    assert result.exit_code == 0, result.output
    assert line(result, "provider:ollama").startswith(f"PASS provider:ollama Ollama at "
                                                      f"{ollama_server.url} has {OLLAMA_MODEL}")


def test_an_unreachable_openai_server_fails_without_printing_the_key(
        project: Path, refusing: RefusingPort) -> None:
    key = "sk-doctor-test-0123456789abcdef"
    result = doctor(project, "--json", OPENAI_API_KEY=key, OPENAI_BASE_URL=f"{refusing.url}/v1")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert checks["provider:cloud"]["status"] == "FAIL"
    assert "not reachable" in checks["provider:cloud"]["detail"]
    assert "OPENAI_BASE_URL" in checks["provider:cloud"]["fix"]
    assert "OPENAI_API_KEY set (cloud)" in checks["keys"]["detail"]
    assert key not in result.output


# -- disk, ports, configs -----------------------------------------------------------------

def test_too_little_free_disk_fails_and_says_how_much_is_needed(project: Path) -> None:
    free_mb = shutil.disk_usage(project).free >> 20
    result = doctor(project, "--min-free", str(free_mb + 1024))
    assert result.exit_code == 1
    text = line(result, "disk")
    assert text.startswith("FAIL") and f"{free_mb + 1024:,} MB needed" in text
    assert "-> free space there, or point TRINITY_DATA_DIR / TRINITY_LOG_DIR at" in text


def test_the_default_disk_need_is_the_estimate_with_supervisord_s_log_cap(project: Path) -> None:
    text = line(doctor(project), "disk")
    assert text.startswith("PASS")
    # supervisord's log and the five programs' at 10 MB x 4 files each, crashwatch's at
    # supervisord's defaults (50 MB x 11): 40 + 5 x 40 + 550.
    assert "(stores 128 MB + run logs 128 MB + supervisord logs at their cap 790 MB)" in text


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A real socket listening on a port the system chose."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_a_taken_metrics_port_fails_and_names_the_setting(project: Path,
                                                          listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = doctor(project, TRINITY_METRICS_PORT=str(port))
    assert result.exit_code == 1
    text = line(result, "ports")
    assert text.startswith("FAIL") and f"127.0.0.1:{port}: port {port} is taken" in text
    assert "TRINITY_METRICS_PORT to a free port" in text


def test_a_taken_bus_endpoint_port_fails_and_names_the_setting(project: Path,
                                                               listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = doctor(project, TRINITY_ENDPOINTS=f"witness=tcp://127.0.0.1:{port}")
    assert result.exit_code == 1
    text = line(result, "ports")
    assert text.startswith("FAIL") and f"bus endpoint witness 127.0.0.1:{port}" in text
    assert "pick another port for witness in TRINITY_ENDPOINTS" in text


def test_a_free_port_passes(project: Path) -> None:
    with socket.socket() as sock:  # bound, not listening: released before the check
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    text = line(doctor(project, TRINITY_METRICS_PORT=str(port)), "ports")
    assert text.startswith("PASS ports") and f"127.0.0.1:{port}" in text


def test_a_broken_supervisord_config_fails_with_supervisord_s_own_message(project: Path) -> None:
    config = project / "supervisor.conf"
    config.write_text(config.read_text().replace("startsecs=1", "startsecs=soon", 1))
    result = doctor(project)
    assert result.exit_code == 1
    text = line(result, "supervisord")
    assert text.startswith("FAIL")
    assert "invalid literal for int() with base 10: 'soon' in section 'program:controller'" \
        in text
    assert "-> restore it with `git checkout -- supervisor.conf`" in text


def test_a_supervisord_config_without_a_program_fails(project: Path) -> None:
    config = project / "supervisor.conf"
    text = config.read_text()
    start = text.index("[program:executor]")
    config.write_text(text[:start] + text[text.index("[eventlistener:crashwatch]"):])
    text = line(doctor(project), "supervisord")
    assert text.startswith("FAIL") and "has no program executor" in text


def test_model_agents_told_to_call_a_model_server_that_is_not_configured_fail(
        project: Path) -> None:
    config = project / "supervisor.conf"
    text = config.read_text()
    start = text.index("[program:models]")
    config.write_text(text[:start] + text[text.index("[program:witness]"):])
    text = line(doctor(project), "supervisord")
    assert text.startswith("FAIL")
    assert ("architect, executor call the model server (TRINITY_MODEL_SERVER) but there is "
            "no [program:models]") in text


def test_a_routing_file_that_is_not_toml_is_one_line(project: Path) -> None:
    routing = routing_file(project, "chain = [embedded\n")
    result = doctor(project, TRINITY_ROUTING=routing)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    text = line(result, "routing")
    assert text.startswith("FAIL") and f"routing policy {routing} is not valid TOML" in text
    assert "-> correct the file named (or unset TRINITY_ROUTING" in text


def test_a_routing_file_with_an_unknown_provider_kind_fails(project: Path) -> None:
    routing = routing_file(project, '[providers.x]\nkind = "llamafile"\n'
                                    '[[routes]]\nchain = ["x"]\n')
    text = line(doctor(project, TRINITY_ROUTING=routing), "routing")
    assert text.startswith("FAIL") and "providers.x.kind must be one of" in text


# -- settings -----------------------------------------------------------------------------

def test_a_misspelt_setting_fails_and_suggests_the_name(project: Path) -> None:
    result = doctor(project, TRINITY_TEST_BUDGT="2")
    assert result.exit_code == 1
    text = line(result, "variables")
    assert text.startswith("FAIL")
    assert "TRINITY_TEST_BUDGT (did you mean TRINITY_TEST_BUDGET?)" in text
    assert line(result, "settings").startswith("PASS settings budget $10.00")


def test_an_unrelated_trinity_variable_is_a_warning(project: Path) -> None:
    result = doctor(project, TRINITY_BURST_EVENTS="100")
    assert result.exit_code == 0
    assert line(result, "variables").startswith("WARN variables not read by Trinity: "
                                                "TRINITY_BURST_EVENTS")


def test_an_invalid_setting_is_one_line_and_the_other_checks_still_run(project: Path) -> None:
    result = doctor(project, TRINITY_TEST_DURATION="a day")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    text = line(result, "settings")
    assert text.startswith("FAIL") and "TRINITY_TEST_DURATION='a day' is not a number" in text
    for name in ("python", "packages", "supervisord", "routing"):
        line(result, name)


def test_budget_and_duration_are_shown(project: Path) -> None:
    text = line(doctor(project, TRINITY_TEST_BUDGET="4", TRINITY_TEST_DURATION="2",
                       TRINITY_TIME_SCALE="2880"), "settings")
    assert text.startswith("PASS settings budget $4.00 (warn), 2 simulated h at time scale "
                           "2880 (0.000694 h real)")


# -- Firestore --------------------------------------------------------------------------

def test_firestore_down_fails_and_says_start_the_emulator(project: Path,
                                                          refusing: RefusingPort) -> None:
    host = refusing.url.removeprefix("http://")
    result = doctor(project, TRINITY_PATTERN_BACKEND="firestore",
                    GOOGLE_CLOUD_PROJECT="demo-doctor", FIRESTORE_EMULATOR_HOST=host)
    assert result.exit_code == 1
    text = line(result, "firestore")
    assert text.startswith("FAIL") and f"the emulator at {host} not reachable" in text
    assert "-> start the emulator (`make firestore-emulator`)" in text


def test_firestore_up_passes(project: Path, firestore_emulator: FirestoreEmulator) -> None:
    result = doctor(project, TRINITY_PATTERN_BACKEND="firestore",
                    GOOGLE_CLOUD_PROJECT="demo-doctor",
                    FIRESTORE_EMULATOR_HOST=firestore_emulator.host)
    text = line(result, "firestore")
    assert text.startswith(f"PASS firestore the emulator at {firestore_emulator.host} answered")


# -- what an earlier run left -------------------------------------------------------------

def _run_in(root: Path) -> Any:
    journal = Journal(root / "trinity_messages.db", source="test")
    try:
        return runs.create_run(journal.conn, {"duration_h": 24.0, "time_scale": 1.0,
                                              "event_interval_min": 30.0})
    finally:
        journal.close()


def test_a_run_not_ended_is_a_warning_naming_resume_and_clean(project: Path) -> None:
    run = _run_in(project)
    result = doctor(project)
    assert result.exit_code == 0
    text = line(result, "stores")
    assert text.startswith("WARN") and f"run {run.run_id} has not ended" in text
    assert "`trinity run --resume --detach` continues it; `make clean` for a clean slate" in text


def test_stores_of_a_finished_run_are_a_warning_naming_make_clean(project: Path) -> None:
    run = _run_in(project)
    journal = Journal(project / "trinity_messages.db", source="test")
    try:
        runs.finish(journal.conn, run.run_id, runs.COMPLETED)
    finally:
        journal.close()
    text = line(doctor(project), "stores")
    assert text.startswith("WARN") and f"the latest {run.run_id} completed" in text
    assert "-> `make clean` for the plan's clean slate" in text


def test_start_24h_runs_doctor_first() -> None:
    dry = subprocess.run(["make", "-n", "start-24h"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    recipe = [text for text in dry.stdout.splitlines() if text.startswith("trinity ")]
    assert recipe == ["trinity doctor", "trinity run --detach"], dry.stdout


def test_a_scenario_file_that_cannot_be_read_fails_the_settings(project: Path) -> None:
    scenario = project / "scenario.jsonl"
    scenario.write_text("{not json\n")
    text = line(doctor(project, TRINITY_SCENARIO=str(scenario)), "settings")
    assert text.startswith(f"FAIL settings TRINITY_SCENARIO: {scenario}")
    assert "-> correct the scenario file" in text


def test_a_running_supervisord_fails_and_says_make_stop(project: Path) -> None:
    config = project / "supervisor.conf"
    # The shipped config with every program a sleep: supervisord itself is real.
    config.write_text("\n".join("command=sleep 600" if text.startswith("command=") else text
                                for text in config.read_text().splitlines()))
    (project / ".run").mkdir(mode=0o700)
    (project / "logs" / "supervisor").mkdir(parents=True)
    subprocess.run([str(BIN / "supervisord"), "-c", str(config)], cwd=project, check=True,
                   timeout=30)
    sup = Supervisor(config)
    try:
        wait_for(sup.is_running, 15, "supervisord to start")
        result = doctor(project)
    finally:
        sup.stop()
    assert result.exit_code == 1
    text = line(result, "processes")
    assert text.startswith(f"FAIL processes supervisord is running for {project}")
    assert "-> `trinity status` shows its run; `make stop` ends it" in text


def test_programs_left_by_a_killed_supervisord_fail_and_say_make_stop(project: Path) -> None:
    # A program of ours as cleanup_orphans knows them: `trinity agent ...` run in the folder.
    fake = project / "trinity"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")  # no child
    fake.chmod(0o755)
    orphan = subprocess.Popen([str(fake), "agent", "witness"], cwd=project)
    try:
        result = doctor(project)
    finally:
        orphan.kill()
        orphan.wait(10)
    text = line(result, "processes")
    assert text.startswith("FAIL processes programs of an earlier run still running "
                           f"without supervisord (pids {orphan.pid})")
    assert text.endswith("-> `make stop` kills them")
