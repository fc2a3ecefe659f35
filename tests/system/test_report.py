"""``trinity report`` of real runs: the session's compressed run (PASSED, the deliberate
restart recorded) and a run with a killed agent (FAILED, naming the criterion), each
checked against an independent reading of the records (tests/controller/reports/_report.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.controller.reports._report import check_report_against_records
from tests.system.conftest import CompressedRun, KilledRun


@pytest.mark.timeout(900)
def test_report_of_the_compressed_run(compressed_run: CompressedRun, tmp_path: Path) -> None:
    project, result = compressed_run.project, compressed_run.result
    assert result.returncode == 0, result.stdout + result.stderr
    text = check_report_against_records(project.root, compressed_run.log_dir, tmp_path)
    assert "Status: PASSED ✓" in text
    assert "End: 20" in text and "Duration: " in text
    assert "deliberate_restart: kill -9 of every process" in text  # the restart half-way
    events = compressed_run.events
    assert (f"Events: {events} emitted of {events} planned, {events} classified, {events} with"
            " an outcome") in text


@pytest.mark.timeout(600)
def test_a_real_run_with_a_killed_agent_reports_failed(killed_run: KilledRun,
                                                       tmp_path: Path) -> None:
    """The session's ``killed_run`` (every program kill -9ed, WITNESS among them), over and
    stopped: its report fails it on Zero Crashes alone and lists the crashes."""
    project = killed_run.project
    assert "witness" in killed_run.killed
    assert killed_run.stopped.returncode == 0, killed_run.stopped.stderr
    log_dir = project.root / "logs" / "24h_test"
    text = check_report_against_records(project.root, log_dir, tmp_path)
    assert "Status: FAILED ✗ (failed: Zero Crashes)" in text
    assert re.search(r"\| ✗ FAIL \| Zero Crashes \| [1-9]\d* unexpected exits \|", text)
    assert "agent_crashed [witness]" in text
