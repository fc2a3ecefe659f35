"""A correction in a running system: WITNESS runs as its own process, ``trinity witness
correct`` is another, and the next event with the same or a nearly identical text is
decided as corrected, by the running WITNESS and by a WITNESS started after a kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, wait_for
from trinity.bus.journal import Journal
from trinity.bus.message import encode_payload
from trinity.contract import NONE, TELEMETRY

TEXT = "Remove duplicate entry for release 2.3.1 from CHANGELOG.md"
SAME_MASKED = "Remove duplicate entry for release 4.0.17 from NEWS.md"
ONE_WORD = "Remove duplicate entry for release 2.3.1 from the CHANGELOG.md"


class Witness:
    """WITNESS alone on a data folder, fed through the journal as the controller does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
        self.env.update(TRINITY_DATA_DIR=str(root), TRINITY_RUN_DIR=str(root / "run"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.journal = Journal(root / "trinity_messages.db", source="test")

    def start(self) -> None:
        with open(self.root / "witness.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trinity.cli", "agent", "witness"], cwd=self.root,
                env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def decide(self, event_id: str, text: str) -> str:
        """Emit one event and wait for WITNESS's decision on it (a pattern, or none)."""
        with self.journal.transaction() as tx:
            tx.publish(TELEMETRY, encode_payload({"event_id": event_id, "message": text}),
                       key=event_id)

        def decided() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail("WITNESS exited:\n"
                            + (self.root / "witness.stderr").read_text(errors="replace")[-3000:])
            try:
                conn = sqlite3.connect(f"file:{self.root / 'trinity_patterns.db'}?mode=ro",
                                       uri=True)
                try:
                    row = conn.execute("SELECT coalesce(pattern, ?) FROM detections"
                                       " WHERE event_id=?", (NONE, event_id)).fetchone()
                finally:
                    conn.close()
            except sqlite3.OperationalError:  # not created yet
                return None
            return None if row is None else str(row[0])

        return str(wait_for(decided, 120, f"WITNESS's decision on {event_id}"))

    def correct(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "trinity"), "witness", "correct", *args],
                              cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=120)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.journal.close()


@pytest.fixture
def witness() -> Iterator[Witness]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="tw"))
    w = Witness(root)
    try:
        yield w
    finally:
        w.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(600)
def test_a_correction_reaches_the_running_witness_and_survives_a_kill(witness: Witness) -> None:
    witness.start()
    first = witness.decide("e1", TEXT)
    label = NONE if first != NONE else "feature_request"  # not what the model said
    done = witness.correct("e1", label)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"event e1: was {first}, now {label}" in done.stdout
    # The running WITNESS looks for corrections every second; a decision taken before it
    # looked would still be the model's, so the events come once it has had the chance.
    wait_for(lambda: witness.decide("probe-" + os.urandom(4).hex(), TEXT) == label, 30,
             "the running WITNESS to take the correction")
    assert witness.decide("e2", TEXT) == label
    assert witness.decide("e3", SAME_MASKED) == label
    assert witness.decide("e4", ONE_WORD) == label
    witness.kill9()
    witness.start()
    assert witness.decide("e5", TEXT) == label
    assert witness.decide("e6", ONE_WORD) == label
