"""``trinity classify``: one JSON line out per line in, in order, whatever the input."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "trinity"


def _classify(data_dir: Path, stdin: bytes, *args: str) -> list[dict[str, object]]:
    env = {"PATH": str(BIN.parent), "TRINITY_DATA_DIR": str(data_dir),
           "HOME": str(Path.home())}
    result = subprocess.run([str(BIN), "classify", *args, "-"], input=stdin, env=env,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def test_every_line_gets_one_result_in_order(short_dir: Path) -> None:
    lines = [
        json.dumps({"id": "a", "message": "panic: runtime error: index out of range [5] "
                                          "with length 3"}),
        "this is not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "d", "severity": "critical"}),
        json.dumps({"id": "e", "message": ""}),
        json.dumps({"id": "f", "message": 42}),
        json.dumps({"id": "g", "message": "x" * (1 << 20)}),
        json.dumps({"id": "h", "message": "Server started on port 8080"}),
        "",
        json.dumps({"id": 9, "message": "Test test_login fails intermittently on CI"}),
    ]
    stdin = "\n".join(lines).encode() + b"\n" + b'{"id": "u", "message": "bad \xff\xfe bytes"}\n'
    out = _classify(short_dir, stdin)
    assert len(out) == len(lines) + 1
    assert out[0] == {"id": "a", "pattern": "critical_error", "confidence": out[0]["confidence"]}
    assert isinstance(out[0]["confidence"], float) and out[0]["confidence"] > 0.5
    assert "not valid JSON" in str(out[1]["error"])
    assert "expected a JSON object, got array" in str(out[2]["error"])
    assert out[3]["id"] == "d" and "missing required field 'message'" in str(out[3]["error"])
    assert out[4]["id"] == "e" and "empty" in str(out[4]["error"])
    assert out[5]["id"] == "f" and "must be a string, got integer" in str(out[5]["error"])
    assert out[6]["id"] == "g" and "confidence" in out[6]  # truncated, still classified
    assert out[7]["id"] == "h" and out[7]["pattern"] is None and "reason" in out[7]
    assert "empty line" in str(out[8]["error"])
    assert out[9]["id"] == 9 and out[9]["pattern"] == "flaky_test"
    assert out[10]["id"] == "u" and "confidence" in out[10]  # undecodable bytes replaced


def test_no_learn_adds_nothing_and_learning_is_idempotent(short_dir: Path) -> None:
    event = json.dumps({"message": "TypeError: Cannot read properties of undefined "
                                   "(reading 'length')"}).encode() + b"\n"

    def counts() -> tuple[int, int]:
        conn = sqlite3.connect(short_dir / "trinity_patterns.db")
        try:
            return (conn.execute("SELECT count(*) FROM exemplars").fetchone()[0],
                    conn.execute("SELECT count(*) FROM detections").fetchone()[0])
        finally:
            conn.close()

    first = _classify(short_dir, event, "--no-learn")
    seeded = counts()
    assert seeded[0] > 800 and seeded[1] == 0  # a fresh install is seeded, nothing learned
    assert _classify(short_dir, event, "--no-learn") == first
    _classify(short_dir, event)
    assert counts() == (seeded[0] + 1, 1)
    _classify(short_dir, event)  # the same event again: already known, not learned twice
    assert counts() == (seeded[0] + 1, 1)
