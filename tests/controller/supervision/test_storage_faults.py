"""Storage faults met by crashwatch: a crash while the journal cannot take the alert is
written to alerts.log directly. The storage faults of supervised runs (a corrupt journal,
pattern store or ledger at start, a full disk, a locked ledger) are
tests/system/test_storage_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trinity.settings import Settings
from trinity.stores.run_logs import read_alerts

GARBAGE = bytes(range(256)) * 64  # 16 KiB that are not a database


# -- crashwatch without a journal --------------------------------------------------------


def test_crashwatch_writes_alerts_log_itself_when_the_journal_cannot_take_the_alert(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crash while the journal is corrupt is not lost: crashwatch appends its alert to
    alerts.log directly; with the journal back it journals again (the controller writes
    alerts.log from there)."""
    from trinity.contract import ALERTS
    from trinity.controller.supervision import crashwatch

    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})
    log = settings.log_dir / "alerts.log"
    settings.messages_db.write_bytes(GARBAGE)
    crash = crashwatch.alert_for("PROCESS_STATE_EXITED", {
        "processname": "witness", "pid": "4242", "expected": "0", "from_state": "RUNNING"})
    assert crash is not None
    with caplog.at_level("ERROR", logger="trinity.controller.supervision.crashwatch"):
        assert crashwatch.record(settings, None, crash) is None
    assert f"cannot journal alert {crash.alert_id}" in caplog.text
    (written,) = read_alerts(log)
    assert written["kind"] == "agent_crashed" and written["source"] == "crashwatch"
    assert written["alert_id"] == crash.alert_id and written["details"]["pid"] == "4242"

    settings.messages_db.unlink()  # moved away: a fresh journal
    again = crashwatch.alert_for("PROCESS_STATE_FATAL", {"processname": "architect"})
    assert again is not None
    journal = crashwatch.record(settings, None, again)
    assert journal is not None
    try:
        (msg,) = journal.read_after(ALERTS, 0, 10)
        assert json.loads(msg.payload)["alert_id"] == again.alert_id
    finally:
        journal.close()
    assert [a["alert_id"] for a in read_alerts(log)] == [crash.alert_id]
