"""``trinity emit`` end to end: a real WITNESS process picks an emitted event up from the
journal alone (nothing on the wire). The logic of emit itself is
tests/controller/ops/test_emit.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.controller.ops.test_emit import _settings, emit_all, line
from trinity.bus.journal import Journal
from trinity.contract import IMPROVEMENT, TELEMETRY


def test_a_running_witness_picks_up_an_emitted_event(short_dir: Path) -> None:
    """WITNESS applies journaled events at its periodic journal check: nothing on the wire."""
    root = short_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update(TRINITY_DATA_DIR=str(root), TRINITY_RUN_DIR=str(root / "run"))
    cfg = _settings(root, root / "run")
    stderr_path = root / "witness.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "trinity.cli", "agent", "witness"],
                                cwd=root, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: (root / "run" / "witness.sock").exists() or proc.poll() is not None,
                 60, "witness to bind its socket")
        assert proc.poll() is None, stderr_path.read_text(errors="replace")[-3000:]
        results = emit_all(cfg, [
            line(message="Fatal error: NoneType in production payment processing",
                 severity="critical", file="payments/stripe.py", line=142,
                 error_type="AttributeError", event_id="ci/e2e-1"),
            line(message="Build 1234 completed successfully in 3m12s"),  # usually no pattern
        ])
        assert all(r.accepted for r in results), results
        ids = [r.event_id for r in results]

        patterns = root / "trinity_patterns.db"

        def detected() -> list[tuple[str, str | None]]:
            if proc.poll() is not None:
                pytest.fail(f"witness exited {proc.returncode}:\n"
                            + stderr_path.read_text(errors="replace")[-3000:])
            conn = sqlite3.connect(patterns)
            try:
                marks = ",".join("?" * len(ids))
                return conn.execute(f"SELECT event_id, pattern FROM detections WHERE event_id"
                                    f" IN ({marks}) ORDER BY event_id", ids).fetchall()
            except sqlite3.OperationalError:  # not created yet
                return []
            finally:
                conn.close()

        found = wait_for(lambda: len(detected()) == len(ids) and detected(), 60,
                         "WITNESS to record a detection for each emitted event")
        assert isinstance(found, list)
        j = Journal(cfg.messages_db, source="test")
        try:
            wait_for(lambda: j.cursor("witness", TELEMETRY) == 2, 10, "the witness cursor")
            signals = {s["event_id"]: s for s in (m.json() for m in
                                                  j.read_after(IMPROVEMENT, 0, 100))}
            outcomes = dict(j.conn.execute("SELECT event_id, status FROM outcomes").fetchall())
            assert j.dead_letters() == []
        finally:
            j.close()
        for event_id, pattern in found:
            if pattern is None:  # an abstention is the event's outcome
                assert outcomes[event_id] == "no_pattern"
            else:  # a detection is a signal for ARCHITECT
                assert signals[event_id]["pattern"] == pattern
        assert dict(found)["ci/e2e-1"] == "critical_error"
        assert signals["ci/e2e-1"]["run_id"] is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, stderr_path.read_text(errors="replace")[-3000:]
