"""One supervised run made to leak, and to be read: secrets never reach a file, and the
stores and the control socket are their owner's only, with every bus socket encrypted.

The run (3 simulated hours at time scale 2880) has recognisable fake secrets in its
environment and CURVE keys (``trinity keys generate``), so the whole bus runs encrypted.
Its model server is hostile: it answers every call with 401 and echoes the API key it was
sent, so the key reaches the error paths (cost ledger, logs) as it would from a server
that quotes it. While it runs, the modes of the live control socket are read; once it is
over, the modes of every store, and then the report, the export and the dashboards are
made from it (one of the session's background runs, tests/system/conftest.py). Both
tests read that one run: every file under the project (logs, snapshots, supervisord's
logs, ``test_config.json``, the SQLite stores as bytes, the report and the export) is
searched for the secrets, and the modes are checked. The scanner itself is tested on
files that do hold a secret (tests/kernel/test_redaction.py), so an empty finding means
something.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import BIN, Project, wait_for
from tests.kernel._secrets import FAKE_KEY, SECRET_ENV, SECRETS, files_holding
from tests.kernel.stores._permissions import mode_of, store_files
from tests.system.conftest import fresh_project
from trinity.cli.keys import keys as keys_command
from trinity.redaction import MASK


class _EchoingModelServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint at its worst: 401, quoting the key it was sent."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        self.server.authorizations.append(auth)  # type: ignore[attr-defined]
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {auth}",
                                     "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def echoing_model_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingModelServer)
    server.authorizations = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class SecuredRun:
    """What the run left, and what was read of it while it ran and right after."""

    project: Project
    run: subprocess.CompletedProcess[str]  # trinity run (stderr folded into stdout)
    control_socket_mode: int
    control_socket_is_socket: bool
    run_dir_mode: int
    status_code: int  # supervisorctl status, by the owner, while the run went on
    stores_after_run: dict[str, int]  # the store files' modes once the run was over
    outputs: list[subprocess.CompletedProcess[str]]  # the run, then report, export, dashboards
    authorizations: list[str]  # the Authorization headers the model server was sent


def _secured_run(cleanup: contextlib.ExitStack) -> SecuredRun:
    project = cleanup.enter_context(fresh_project("trs"))
    with echoing_model_server() as server:
        project.env.update(SECRET_ENV)
        project.env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
        keys = CliRunner().invoke(keys_command, ["generate"],
                                  env={"TRINITY_DATA_DIR": str(project.root)})
        assert keys.exit_code == 0, keys.output
        proc = subprocess.Popen(
            [str(BIN / "trinity"), "run", "--duration", "3", "--time-scale", "2880"],
            cwd=project.root, env=project.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            control = project.root / ".run" / "supervisor.sock"
            wait_for(control.exists, 60, "supervisord's control socket")
            is_socket = stat.S_ISSOCK(control.stat().st_mode)
            socket_mode, dir_mode = mode_of(control), mode_of(control.parent)
            status_code = project.supervisorctl("status").returncode
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        run = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        stores = store_files(project.root)
        outputs = [run, project.trinity("report"),
                   project.trinity("export", "--format", "csv", "--output",
                                   str(project.root / "exports"))]
        outputs += [project.trinity("dashboard", board)
                    for board in ("cost", "patterns", "system")]
        return SecuredRun(project, run, socket_mode, is_socket, dir_mode, status_code, stores,
                          outputs, list(server.authorizations))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def secured_run() -> Iterator[SecuredRun]:
    with contextlib.ExitStack() as cleanup:
        yield _secured_run(cleanup)


@pytest.mark.timeout(400)
def test_no_secret_in_any_file_a_run_writes(secured_run: SecuredRun) -> None:
    project = secured_run.project
    for result in secured_run.outputs:
        assert result.returncode == 0, result.stdout + result.stderr

    # The key was used, came back in the server's errors and was recorded (redacted).
    assert f"Bearer {FAKE_KEY}" in secured_run.authorizations
    conn = sqlite3.connect(f"file:{project.root / 'trinity_costs.db'}?mode=ro", uri=True)
    errors = [e for (e,) in conn.execute(
        "SELECT error FROM calls WHERE provider = 'cloud' AND status != 'success'")]
    conn.close()
    assert errors and all(f"Incorrect API key provided: Bearer {MASK}" in e for e in errors)

    # The scan covers what the plan says a run writes.
    written = {p.relative_to(project.root).as_posix() for p in project.root.rglob("*")}
    for expected in ("logs/24h_test/trinity.log", "logs/24h_test/test_config.json",
                     "logs/supervisor/supervisord.log", "logs/supervisor/architect.log",
                     "trinity_messages.db", "trinity_costs.db", "trinity_patterns.db",
                     "exports/llm_calls.csv"):
        assert expected in written
    assert any(name.startswith("logs/24h_test/costs/cost_snapshot_") for name in written)
    assert any(name.startswith("reports/") and name.endswith(".html") for name in written)

    assert files_holding(project.root, SECRETS) == {}
    for result in secured_run.outputs:
        for secret in SECRETS:
            assert secret not in result.stdout + result.stderr, result.args
    config = json.loads((project.root / "logs/24h_test/test_config.json").read_text())
    assert config["environment"]["TRINITY_TEST_TOKEN"] == MASK


@pytest.mark.timeout(400)
def test_a_supervised_run_with_curve_keys_keeps_socket_and_stores_private(
    secured_run: SecuredRun
) -> None:
    assert secured_run.control_socket_is_socket
    assert secured_run.control_socket_mode == 0o700
    assert secured_run.run_dir_mode == 0o700
    assert secured_run.status_code in (0, 3)  # the owner gets in
    out = secured_run.run.stdout
    assert secured_run.run.returncode == 0, out
    # Every event went through the CURVE bus: WITNESS classified each one.
    detected = re.search(r"100% Event Detection\s+(\d+) of (\d+) classified", out)
    assert detected and detected[1] == detected[2] and int(detected[1]) >= 6, out
    log = (secured_run.project.root / "logs" / "24h_test" / "trinity.log").read_text()
    for name in ("witness", "architect", "executor", "controller"):
        assert f"{name}: every bus socket uses CURVE" in log
    modes = secured_run.stores_after_run
    assert {"trinity_messages.db", "trinity_costs.db", "trinity_patterns.db",
            "trinity_patterns.faiss"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600)
