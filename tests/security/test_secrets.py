"""Secrets never reach a file: a real compressed run with recognisable fake secrets in its
environment, then every file under the project (logs, snapshots, supervisord's logs,
``test_config.json``, the SQLite stores as bytes, the report and the export) is searched.

The model server of the run is hostile: it answers every call with 401 and echoes the
API key it was sent, so the key reaches the error paths (cost ledger, logs) as it
would from a server that quotes it. The scanner itself is tested on files that do hold
a secret, so an empty finding means something.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Project
from trinity import logs
from trinity.redaction import MASK, Redactor, is_secret_name, secret_values, withhold_secrets

FAKE_KEY = "sk-trinityFAKE" + "q7Zr2Lm9" * 4
FAKE_TOKEN = "tok-FAKE-trinity-7f3a9c21e4"
FAKE_PASSWORD = "pw-FAKE-trinity-hunter22"
SECRETS = (FAKE_KEY, FAKE_TOKEN, FAKE_PASSWORD)
SECRET_ENV = {"OPENAI_API_KEY": FAKE_KEY, "TRINITY_TEST_TOKEN": FAKE_TOKEN,
              "MY_DB_PASSWORD": FAKE_PASSWORD}


def _needles(secret: str) -> tuple[bytes, ...]:
    """The byte forms a secret could be stored in: UTF-8 (SQLite text, JSON, CSV, logs),
    JSON-escaped, and UTF-16 (neither byte order)."""
    return (secret.encode(), json.dumps(secret)[1:-1].encode(),
            secret.encode("utf-16-le"), secret.encode("utf-16-be"))


def _contents(path: Path) -> Iterator[tuple[str, bytes]]:
    """The file's bytes, and each member of a zip archive (xlsx, docx) unpacked."""
    data = path.read_bytes()
    yield str(path), data
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield f"{path}!{member}", archive.read(member)


def files_holding(root: Path, secrets: tuple[str, ...]) -> dict[str, list[str]]:
    """Every file under ``root`` (recursively, hidden ones included) holding a secret."""
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        for name, data in _contents(path):
            hits = [s for s in secrets if any(n in data for n in _needles(s))]
            if hits:
                found[name] = hits
    return found


# -- the scanner finds what is there ----------------------------------------------


def test_the_scanner_finds_a_secret_in_text_json_sqlite_and_zip(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "notes.txt").write_text(f"{FAKE_KEY[:-1]} is not the key\n")
    assert files_holding(clean, SECRETS) == {}

    (tmp_path / "plain.log").write_text(f"header\nkey={FAKE_KEY}\n")
    (tmp_path / "escaped.json").write_text(json.dumps({"msg": f'said "{FAKE_TOKEN}"'}))
    conn = sqlite3.connect(tmp_path / "store.db")
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", [("filler " * 50,)] * 100)
    conn.execute("INSERT INTO t VALUES (?)", (f"error: {FAKE_PASSWORD}",))
    conn.commit()
    conn.close()
    with zipfile.ZipFile(tmp_path / "book.xlsx", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sheet1.xml", f"<v>{FAKE_TOKEN}</v>" + "x" * 1000)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "wide.txt").write_bytes(FAKE_PASSWORD.encode("utf-16-le"))

    found = files_holding(tmp_path, SECRETS)
    assert found == {
        str(tmp_path / "plain.log"): [FAKE_KEY],
        str(tmp_path / "escaped.json"): [FAKE_TOKEN],
        str(tmp_path / "store.db"): [FAKE_PASSWORD],
        str(tmp_path / "book.xlsx!sheet1.xml"): [FAKE_TOKEN],
        str(tmp_path / ".hidden" / "wide.txt"): [FAKE_PASSWORD],
    }


# -- what counts as secret, and masking -----------------------------------------


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "GITHUB_TOKEN", "MY_DB_PASSWORD",
                                  "DB_PASSWD", "AWS_SECRET_ACCESS_KEY", "apikey",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "TRINITY_ALERT_WEBHOOK"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "TRINITY_DATA_DIR", "TRINITY_CURVE_DIR",
                                  "TRINITY_ENDPOINTS", "OPENAI_BASE_URL", "PWD"])
def test_names_that_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_secret_values_and_withholding() -> None:
    env = {**SECRET_ENV, "SHORT_TOKEN": "abc", "PATH": "/usr/bin", "EMPTY_KEY": ""}
    assert set(secret_values(env)) == set(SECRETS)  # "abc" is too short to mask in text
    assert withhold_secrets(env) == {
        "OPENAI_API_KEY": MASK, "TRINITY_TEST_TOKEN": MASK, "MY_DB_PASSWORD": MASK,
        "SHORT_TOKEN": MASK, "PATH": "/usr/bin", "EMPTY_KEY": ""}


def test_the_redactor_masks_values_their_json_form_and_any_openai_key() -> None:
    quoted = 'pa"ss\\word-1'
    redact = Redactor([FAKE_TOKEN, quoted, "abc"])
    line = json.dumps({"a": f"t={FAKE_TOKEN}", "b": quoted, "c": "abc",
                       "d": "Bearer sk-otherKEY12345678", "e": "sk-abc***wxyz"})
    out = redact(line)
    for secret in (FAKE_TOKEN, json.dumps(quoted)[1:-1], "sk-otherKEY12345678", "abc***"):
        assert secret not in out
    assert json.loads(out) == {"a": f"t={MASK}", "b": MASK, "c": "abc",
                               "d": f"Bearer sk-{MASK}", "e": f"sk-{MASK}"}


def test_log_lines_are_redacted_in_the_file_and_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    log_file = tmp_path / "trinity.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.excepthook, threading.excepthook
    try:
        logs.configure("tester", log_file)
        log = logging.getLogger("trinity.test")
        log.warning("calling with %s", FAKE_KEY, extra={"auth": f"Bearer {FAKE_TOKEN}"})
        log.error("db said: password %s rejected", FAKE_PASSWORD)
        try:
            raise RuntimeError(f"server echoed {FAKE_KEY}")
        except RuntimeError:
            log.exception("call failed")
        sys.excepthook(ValueError, ValueError(f"uncaught {FAKE_TOKEN}"), None)
        worker = threading.Thread(target=lambda: 1 / 0 if FAKE_PASSWORD else None)
        worker.start()
        worker.join()
        for handler in logging.getLogger().handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level, sys.excepthook, threading.excepthook = saved
        root.setLevel(level)
    written = log_file.read_text()
    stderr = capfd.readouterr().err
    lines = [json.loads(line) for line in written.splitlines()]
    assert len(lines) == 5, written  # every record made it, redacted rather than dropped
    assert lines[0]["auth"] == f"Bearer {MASK}"
    assert lines[2]["exc"].endswith(f"RuntimeError: server echoed {MASK}")
    assert "ZeroDivisionError" in lines[4]["exc"]
    for text in (written, stderr):
        assert MASK in text
        for secret in SECRETS:
            assert secret not in text


# -- a real run --------------------------------------------------------------------


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


@pytest.fixture
def echoing_model_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingModelServer)
    server.authorizations = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_secret_in_any_file_a_run_writes(
    project: Project, echoing_model_server: ThreadingHTTPServer
) -> None:
    port = echoing_model_server.server_address[1]
    project.env.update(SECRET_ENV)
    project.env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    run = project.trinity("run", "--duration", "3", "--time-scale", "2880", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    outputs = [run]
    outputs.append(project.trinity("report"))
    outputs.append(project.trinity("export", "--format", "csv", "--output",
                                   str(project.root / "exports")))
    for board in ("cost", "patterns", "system"):
        outputs.append(project.trinity("dashboard", board))
    for result in outputs:
        assert result.returncode == 0, result.stdout + result.stderr

    # The key was used, came back in the server's errors and was recorded (redacted).
    assert f"Bearer {FAKE_KEY}" in echoing_model_server.authorizations  # type: ignore[attr-defined]
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
    for result in outputs:
        for secret in SECRETS:
            assert secret not in result.stdout + result.stderr, result.args
    config = json.loads((project.root / "logs/24h_test/test_config.json").read_text())
    assert config["environment"]["TRINITY_TEST_TOKEN"] == MASK
