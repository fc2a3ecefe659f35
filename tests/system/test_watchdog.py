"""Who watches the controller, end to end under a real supervisord: the controller
SIGSTOPped in the middle of a run is restarted by supervisord's listener, resumes the run,
and every event still has exactly one outcome. The check itself, on a fake supervisord, is
tests/controller/supervision/test_watchdog.py."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.conftest import Project, wait_for
from tests.system.test_healing import _alerts, _gone, _pid
from tests.system.test_storage_faults import assert_each_event_handled_once, start_run
from trinity.controller.supervision.watchdog import alive_path
from trinity.settings import Settings


@pytest.mark.timeout(180)
def test_a_hung_controller_is_restarted_and_the_run_loses_nothing(project: Project) -> None:
    """The controller SIGSTOPped in the middle of a run and left stopped: within the
    deadline and one 5 s tick, crashwatch restarts it through supervisord (no crash
    alert: a requested stop), the new controller continues the same run, and every event
    has exactly one outcome and one detection."""
    project.env["TRINITY_CONTROLLER_DEADLINE"] = "4"
    db = start_run(project, "--duration", "2", "--time-scale", "720")
    settings = Settings.from_env(project.env)
    wait_for(lambda: db.execute("SELECT count(*) FROM outcomes").fetchone()[0] >= 1, 60,
             "the first outcome")
    run_id = db.execute("SELECT run_id FROM runs").fetchone()[0]
    status = json.loads(project.trinity("status", "--json").stdout)
    assert status["controller"]["alive"] and status["controller"]["loop_age_s"] < 2, status
    old = _pid(project, "controller")
    os.kill(old, signal.SIGSTOP)
    stopped = time.time()
    wait_for(lambda: psutil.Process(old).status() == psutil.STATUS_STOPPED, 5, "SIGSTOP")
    (restart,) = wait_for(lambda: _alerts(project, "agent_restarted"), 30,  # type: ignore[misc]
                          "the controller's agent_restarted alert")
    took = time.time() - stopped
    assert restart["agent"] == "controller"
    details = restart["details"]
    assert details["pid"] == old and details["process_status"] == "stopped"
    assert 4.0 < details["silent_s"] < 4.0 + 5 + 3, details
    new = details["new_pid"]
    assert new != old and _gone(old) and _pid(project, "controller") == new
    wait_for(lambda: alive_path(settings).stat().st_mtime > stopped + 4, 15,
             "the new controller's loop to touch its alive file")
    wait_for(lambda: db.execute("SELECT status FROM runs").fetchone()[0] != "active", 120,
             "the run to end")
    assert db.execute("SELECT run_id FROM runs").fetchall() == [(run_id,)]
    assert_each_event_handled_once(db, project.root, 4)
    assert _alerts(project, "agent_crashed") == []
    assert len(_alerts(project, "agent_restarted")) == 1
    print(f"\nSIGSTOP of the controller -> restart alert journaled after {took:.1f} s")
    db.close()
