"""The alert webhook in a supervised run: every alert arrives, and a webhook that hangs
or fails never slows the controller."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable

import pytest

from tests.conftest import Project, wait_for
from tests.controller.process.test_webhook import Hook
from trinity.stores.run_logs import read_alerts

# Each test asks for ``serve`` before ``project``: fixtures end in reverse order, so the
# run is stopped first and its idle keep-alive connection to the hook closes; the other
# way round, stopping the hook waited out the handler's 10 s idle timeout.


def _pid(project: Project, program: str) -> int:
    for line in project.supervisorctl("status").stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == program and "pid" in parts:
            return int(parts[parts.index("pid") + 1].rstrip(","))
    raise AssertionError(f"{program} has no pid")


def _sim_elapsed(project: Project) -> float:
    db = sqlite3.connect(project.db)
    try:
        return float(db.execute("SELECT sim_elapsed_s FROM runs").fetchone()[0])
    finally:
        db.close()


def test_alerts_are_posted_to_the_webhook(serve: Callable[..., Hook], project: Project) -> None:
    hook = serve(200)
    project.env["TRINITY_ALERT_WEBHOOK"] = hook.url()
    result = project.trinity("run", "--detach", "--time-scale", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    os.kill(_pid(project, "witness"), signal.SIGKILL)
    wait_for(lambda: any(b["kind"] == "agent_crashed" for b in hook.bodies()), 20,
             "the crash alert at the webhook")
    posted = {b["alert_id"]: b for b in hook.bodies()}
    logged = {a["alert_id"]: a for a in read_alerts(project.alerts_log)}
    assert posted.keys() == logged.keys()  # each alert once, the same one
    crash = next(b for b in posted.values() if b["kind"] == "agent_crashed")
    assert crash["agent"] == "witness" and crash["severity"] == "critical"
    assert hook.received[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize("answer", ["hang", 500])
def test_a_hanging_or_failing_webhook_does_not_slow_the_run(
        serve: Callable[..., Hook], project: Project, answer: int | str) -> None:
    hook = serve(answer, hang_s=60)
    project.env["TRINITY_ALERT_WEBHOOK"] = hook.url()
    result = project.trinity("run", "--detach", "--time-scale", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    controller = _pid(project, "controller")
    for program in ("witness", "executor"):
        killed_at = time.monotonic()
        os.kill(_pid(project, program), signal.SIGKILL)

        def logged(program: str = program) -> bool:
            return any(a["kind"] == "agent_crashed" and a["agent"] == program
                       for a in read_alerts(project.alerts_log))

        wait_for(logged, 15, f"the {program} crash in alerts.log")
        assert time.monotonic() - killed_at < 10
        wait_for(lambda: hook.count() >= 1, 15, "the webhook to be called")
    # Simulated time keeps its pace (60 s per real second) while the webhook misbehaves.
    before, t0 = _sim_elapsed(project), time.monotonic()
    time.sleep(3)
    pace = (_sim_elapsed(project) - before) / (time.monotonic() - t0)
    assert pace > 40, pace
    assert _pid(project, "controller") == controller  # never restarted
