"""Self-healing end to end, under a real supervisord: a SIGSTOPped agent is restarted and
the run loses nothing, and repeated hangs hit the restart intensity. The restart policy
itself, on a fake clock and a fake supervisord, is tests/controller/process/test_healing.py."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psutil
import pytest

from tests.conftest import Project, wait_for
from tests.system.test_storage_faults import (
    alerts_of,
    assert_each_event_handled_once,
    start_run,
)

# -- end to end, under a real supervisord ------------------------------------------------


def _alerts(project: Project, kind: str, agent: str | None = None) -> list[dict[str, Any]]:
    return alerts_of(project.alerts_log, kind, agent)


def _pid(project: Project, program: str) -> int:
    """The program's pid once supervisord calls it RUNNING (a restarted process is
    STARTING for startsecs, 1 s, and may beat before that)."""
    info = wait_for(lambda: (i := project.supervisor().process(program))["statename"]
                    == "RUNNING" and i, 10, f"{program} RUNNING")
    assert isinstance(info, dict)
    return int(info["pid"])


def _stop(pid: int) -> float:
    os.kill(pid, signal.SIGSTOP)
    stopped_ms = time.time() * 1000
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5, "SIGSTOP")
    return stopped_ms


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(180)
def test_a_hung_agent_is_restarted_and_the_run_loses_nothing(project: Project) -> None:
    """WITNESS SIGSTOPped in the middle of a run and left stopped: the controller finds it
    silent with its process still there, restarts it through supervisord (no crash alert:
    supervisord took it for a requested stop), the new process beats and works the
    backlog off (an event emitted while WITNESS was stopped among it), and every event of
    the run has exactly one outcome and one detection."""
    db = start_run(project, "--duration", "4", "--time-scale", "720", "--event-interval", "60")
    wait_for(lambda: db.execute("SELECT count(*) FROM outcomes").fetchone()[0] >= 2, 60,
             "the first outcomes")
    old = _pid(project, "witness")
    stopped_ms = _stop(old)
    backlog = project.root / "while-stopped.jsonl"
    backlog.write_text(json.dumps({"event_id": "while-stopped", "severity": "info",
                                   "message": "Server started on port 8080"}) + "\n")
    emitted = project.trinity("emit", "--quiet", str(backlog))
    assert emitted.returncode == 0, emitted.stdout + emitted.stderr
    (restart,) = wait_for(lambda: _alerts(project, "agent_restarted"), 15,  # type: ignore[misc]
                          "the agent_restarted alert")
    (silent,) = _alerts(project, "agent_silent")
    assert silent["agent"] == restart["agent"] == "witness"
    details = restart["details"]
    assert details["pid"] == old and details["process_status"] == "stopped"
    new = details["new_pid"]
    assert new != old and _gone(old)
    # Three missed one-second beats; one more deadline if the controller itself was held
    # up meanwhile (a turn over 1 s on a loaded machine), as silence then counts afresh.
    assert 3.0 < details["silent_s"] < 2 * 3.0 + 2.0, details
    assert restart["severity"] == "warning" and restart["run_id"] == silent["run_id"]
    (recovered,) = wait_for(lambda: _alerts(project, "agent_recovered"), 30,  # type: ignore[misc]
                            "the agent_recovered alert")
    assert recovered["agent"] == "witness" and recovered["ts_ms"] >= restart["ts_ms"]
    assert _pid(project, "witness") == new
    beat_pid = db.execute("SELECT pid FROM agents WHERE name='witness'").fetchone()[0]
    assert beat_pid == new
    print(f"\nSIGSTOP -> restart {(restart['ts_ms'] - stopped_ms) / 1000:.2f} s "
          f"(restart call {details['restart_s']:.3f} s), -> first heartbeat of the new "
          f"process {(recovered['ts_ms'] - stopped_ms) / 1000:.2f} s")

    wait_for(lambda: db.execute("SELECT status FROM runs").fetchone()[0] != "active", 120,
             "the run to end")
    assert_each_event_handled_once(db, project.root, 4, also=["while-stopped"])
    assert _alerts(project, "agent_crashed") == [] and len(_alerts(project, "agent_silent")) == 1
    assert len(_alerts(project, "agent_restarted")) == 1
    db.close()


@pytest.mark.timeout(120)
def test_repeated_hangs_hit_the_restart_intensity(project: Project) -> None:
    """At most one restart per minute: EXECUTOR hangs, is restarted; its new process
    hangs too, and that is one critical alert, not a restart; once it is let go and
    beats, it is watched as before."""
    project.env["TRINITY_RESTART_INTENSITY"] = "1"
    project.env["TRINITY_RESTART_PERIOD"] = "60"
    db = start_run(project, "--duration", "24", "--time-scale", "60")
    first = _pid(project, "executor")
    _stop(first)
    wait_for(lambda: _alerts(project, "agent_recovered", "executor"), 20,
             "EXECUTOR restarted and beating")
    (restart,) = _alerts(project, "agent_restarted")
    second = restart["details"]["new_pid"]
    assert _gone(first) and _pid(project, "executor") == second
    _stop(second)
    (limit,) = wait_for(lambda: _alerts(project, "restart_intensity_exceeded"),  # type: ignore[misc]
                        15, "the restart_intensity_exceeded alert")
    assert limit["agent"] == "executor" and limit["severity"] == "critical"
    assert limit["details"]["pid"] == second
    assert limit["details"]["restarts_in_period"] == 1
    assert limit["details"]["intensity"] == 1 and limit["details"]["period_s"] == 60
    time.sleep(3)  # three more checks: still stopped, not restarted, alerted once
    assert _pid(project, "executor") == second
    assert psutil.Process(second).status() == psutil.STATUS_STOPPED
    assert len(_alerts(project, "restart_intensity_exceeded")) == 1
    assert len(_alerts(project, "agent_restarted")) == 1
    os.kill(second, signal.SIGCONT)
    wait_for(lambda: len(_alerts(project, "agent_recovered", "executor")) == 2, 10,
             "EXECUTOR to beat again")
    assert _pid(project, "executor") == second
    assert len(_alerts(project, "agent_restarted")) == 1
    assert _alerts(project, "agent_crashed") == []
    db.close()
