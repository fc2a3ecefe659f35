"""Recognisable fake secrets, and a scanner that finds them in any file under a folder:
used by the redaction tests (tests/kernel/test_redaction.py, which also test the scanner
itself, so that an empty finding means something) and by the supervised run whose every
written file is searched (tests/system/test_security.py)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

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
