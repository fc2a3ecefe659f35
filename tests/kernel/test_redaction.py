"""What counts as a secret, how it is masked in text and log lines, and the scanner the
supervised run's secret search relies on (tests/system/test_security.py), tested on files
that do hold a secret so that an empty finding there means something."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from tests.kernel._secrets import (
    FAKE_KEY,
    FAKE_PASSWORD,
    FAKE_TOKEN,
    SECRET_ENV,
    SECRETS,
    files_holding,
)
from trinity import logs
from trinity.redaction import MASK, Redactor, is_secret_name, secret_values, withhold_secrets

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
