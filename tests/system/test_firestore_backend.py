"""Supervised runs on the Firestore pattern backend, against a real emulator:

* a Firestore that stops answering mid-run: WITNESS's heartbeat reports it, the
  controller raises a ``database_error`` alert, events go on being classified, and once
  Firestore is back everything detected meanwhile is in it;
* a compressed run with the kill -9 of every process and ``--resume`` half-way: persistence
  is validated against Firestore, which at the end holds each of the run's detections and
  the pattern counters.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import uuid
from typing import Any

import pytest

from tests.conftest import Project, wait_for
from tests.firestore_emulator import FirestoreEmulator, need_emulator, trinity_collections
from trinity.stores.patterns.firestore import pending, wait_sent
from trinity.stores.run_logs import read_alerts


@pytest.mark.timeout(240)
def test_a_firestore_outage_mid_run_is_alerted_and_nothing_is_lost(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervised run on the Firestore backend; the emulator is frozen (SIGSTOP) for a
    while, then thawed."""
    need_emulator()
    own = FirestoreEmulator().start()  # frozen below: not the session's shared one
    project_id = f"trinity-{uuid.uuid4().hex[:12]}"
    project.env.update({"TRINITY_PATTERN_BACKEND": "firestore",
                        "GOOGLE_CLOUD_PROJECT": project_id,
                        "FIRESTORE_EMULATOR_HOST": own.host})
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own.host)
    patterns_db = project.root / "trinity_patterns.db"
    try:
        result = project.trinity("run", "--detach", "--duration", "24", "--time-scale",
                                 "600", "--event-interval", "5")
        assert result.returncode == 0, result.stdout + result.stderr

        def detections() -> int:
            try:
                conn = sqlite3.connect(f"file:{patterns_db}?mode=ro", uri=True, timeout=10)
                try:
                    return int(conn.execute("SELECT count(*) FROM detections").fetchone()[0])
                finally:
                    conn.close()
            except sqlite3.Error:
                return 0

        wait_for(lambda: detections() >= 2, 90, "WITNESS to record detections")
        assert own.pid is not None
        os.kill(own.pid, signal.SIGSTOP)
        try:
            frozen_at = detections()

            def alerted() -> list[dict[str, Any]]:
                return [a for a in read_alerts(project.alerts_log)
                        if a.get("kind") == "database_error"
                        and a.get("details", {}).get("database") == "firestore"]

            wait_for(alerted, 60, "a database_error alert naming Firestore")
            wait_for(lambda: detections() >= frozen_at + 3, 60,
                     "WITNESS to go on classifying while Firestore is away")
            with sqlite3.connect(patterns_db, timeout=10) as conn:
                assert pending(conn) > 0  # waiting in the outbox, not lost
        finally:
            os.kill(own.pid, signal.SIGCONT)
        with sqlite3.connect(patterns_db, timeout=10) as conn:
            assert wait_sent(conn, 90), "the outbox was not sent after Firestore came back"
        project.trinity("stop")
        with sqlite3.connect(patterns_db, timeout=10) as conn:
            local = {e for (e,) in conn.execute("SELECT event_id FROM detections")}
            counts = dict(conn.execute("SELECT pattern, detections FROM patterns").fetchall())
        remote = trinity_collections(project_id)
        assert {d["event_id"] for d in remote["detections"].values()} == local
        assert {p: d["detections"] for p, d in remote["patterns"].items()} == counts
        assert [a for a in read_alerts(project.alerts_log)
                if a.get("kind") == "agent_crashed"] == []
    finally:
        project.trinity("stop")
        own.stop()


@pytest.mark.timeout(400)
def test_a_compressed_run_with_kill_and_resume_ends_with_every_pattern_in_firestore(
    project: Project, firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 simulated hours (an event every 4 h) on the Firestore backend, kill -9 of
    everything at hour 12 and --resume: persistence is validated against Firestore, and
    at the end Firestore holds each of the run's detections and the pattern counters."""
    project_id = f"trinity-{uuid.uuid4().hex[:12]}"
    project.env.update({"TRINITY_PATTERN_BACKEND": "firestore",
                        "GOOGLE_CLOUD_PROJECT": project_id,
                        "FIRESTORE_EMULATOR_HOST": firestore_emulator.host})
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    try:
        # 6 events: the run is bound by the model agents (~3 s of calls per event) or by
        # its clock (30 s at 2880 for 24 h), whichever is slower.
        result = project.trinity("run", "--duration", "24", "--time-scale", "5760",
                                 "--event-interval", "240", "--restart-at", "12",
                                 timeout=360)
        out = result.stdout + result.stderr
        assert "persistence: OK" in out, out
        check = project.trinity("validate-persistence", "--json")
        report = json.loads(check.stdout)
        assert check.returncode == 0 and report["ok"], report["problems"]
        in_firestore = report["state"]["firestore"]
    finally:
        project.trinity("stop")
    patterns_db = project.root / "trinity_patterns.db"
    with sqlite3.connect(patterns_db) as conn:
        run_id = conn.execute("SELECT run_id FROM detections WHERE run_id IS NOT NULL"
                              " LIMIT 1").fetchone()[0]
        local = dict(conn.execute("SELECT event_id, pattern FROM detections WHERE run_id=?",
                                  (run_id,)).fetchall())
        counters = dict(conn.execute("SELECT pattern, detections FROM patterns").fetchall())
    assert len(local) == 6  # one per event (no noise events)
    remote = trinity_collections(project_id)
    assert {d["event_id"]: d["pattern"] for d in remote["detections"].values()
            if d["run_id"] == run_id} == local
    assert in_firestore["run_detections"] == len(local)
    assert {p: d["detections"] for p, d in remote["patterns"].items()} == counters
    assert sum(counters.values()) == sum(1 for p in local.values() if p)
