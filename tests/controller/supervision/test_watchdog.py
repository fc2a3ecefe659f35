"""Who watches the controller: supervisord's listener restarts a hung controller.

The check itself, on a fake supervisord with real processes (stopped, running, gone).
End to end under a real supervisord (the controller SIGSTOPped in the middle of a run is
restarted, resumes the run, and every event still has exactly one outcome) is
tests/system/test_watchdog.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.controller.conftest import FakeSupervisord, Processes
from trinity.controller.supervision.watchdog import AliveFile, ControllerWatch
from trinity.errors import ConfigError
from trinity.settings import Settings

DEADLINE_S = 30.0


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(tmp_path),
                              "TRINITY_RUN_DIR": str(tmp_path / "run"), **env})


def _watch(tmp_path: Path, processes: Processes,
           **env: str) -> tuple[FakeSupervisord, ControllerWatch]:
    """A fake supervisord and the watch that asks it, its alive file in ``tmp_path``."""
    settings = _settings(tmp_path, **env)
    settings.run_dir.mkdir(exist_ok=True)
    fake = FakeSupervisord(processes)
    return fake, ControllerWatch(settings, fake)


def _age(path: Path, seconds: float) -> None:
    """Make the alive file look last touched ``seconds`` ago."""
    path.touch()
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_stale_alive_file_restarts_a_stopped_controller(
    tmp_path: Path, processes: Processes
) -> None:
    fake, watch = _watch(tmp_path, processes)
    pid = processes.hung()
    fake.set("controller", pid)
    _age(watch.path, DEADLINE_S + 5)
    alert = watch.check()
    assert alert is not None and alert.kind == "agent_restarted"
    assert alert.agent == "controller" and alert.severity == "warning"
    assert alert.details["pid"] == pid and alert.details["process_status"] == "stopped"
    assert alert.details["new_pid"] == fake.info["controller"]["pid"] != pid
    assert DEADLINE_S < alert.details["silent_s"] < DEADLINE_S + 10
    assert fake.restarted == [("controller", pid)]


def test_an_asleep_controller_is_hung_once_its_main_thread_did_not_wake_between_looks(
    tmp_path: Path, processes: Processes
) -> None:
    """Deadlocked or blocked in a system call: asleep, and its main thread never wakes.
    The first look counts its wake-ups, the next one (5 s later in crashwatch) restarts."""
    fake, watch = _watch(tmp_path, processes)
    pid = processes.asleep()
    fake.set("controller", pid)
    _age(watch.path, DEADLINE_S + 5)
    assert watch.check() is None
    time.sleep(0.2)
    alert = watch.check()
    assert alert is not None and alert.kind == "agent_restarted"
    assert alert.details["pid"] == pid and alert.details["process_status"] == "sleeping"


def test_a_controller_waiting_on_a_lock_is_slow_not_hung(
    tmp_path: Path, processes: Processes
) -> None:
    """Its loop silent past the deadline, but its main thread keeps waking up, as in
    SQLite's busy wait for a lock: restarting would not end the wait, so it is left."""
    fake, watch = _watch(tmp_path, processes)
    waiting = subprocess.Popen([sys.executable, "-c",
                                "import time\nwhile True: time.sleep(0.01)"])
    processes.started.append(waiting)
    time.sleep(0.3)
    fake.set("controller", waiting.pid)
    _age(watch.path, DEADLINE_S + 5)
    for _ in range(5):
        assert watch.check() is None
        time.sleep(0.1)
    assert fake.restarted == []
    os.kill(waiting.pid, signal.SIGSTOP)  # now it is hung, whatever it was doing
    wait_for(lambda: psutil.Process(waiting.pid).status() == psutil.STATUS_STOPPED, 5,
             "SIGSTOP")
    alert = watch.check()
    assert alert is not None and alert.details["process_status"] == "stopped"


def test_a_fresh_alive_file_or_a_young_process_is_left_alone(
    tmp_path: Path, processes: Processes
) -> None:
    fake, watch = _watch(tmp_path, processes)
    pid = processes.hung()
    fake.set("controller", pid)
    _age(watch.path, DEADLINE_S - 5)
    assert watch.check() is None
    # No file at all, or one left by an earlier controller: the process's own start
    # counts, so a controller younger than the deadline is still starting.
    watch.path.unlink()
    fake.set("controller", pid, uptime_s=DEADLINE_S - 5)
    assert watch.check() is None
    _age(watch.path, 3600)
    assert watch.check() is None
    assert fake.restarted == []


def test_a_controller_supervisord_does_not_call_running_is_left_to_it(
    tmp_path: Path, processes: Processes
) -> None:
    fake, watch = _watch(tmp_path, processes)
    _age(watch.path, 3600)
    for state in ("STARTING", "BACKOFF", "STOPPED", "EXITED", "FATAL"):
        fake.set("controller", processes.spawn().pid, statename=state)
        assert watch.check() is None, state
    fake.set("controller", processes.zombie() + 10_000_000)  # no such process
    assert watch.check() is None
    assert fake.restarted == []


def test_restarts_past_the_intensity_escalate_once_until_the_loop_runs_again(
    tmp_path: Path, processes: Processes
) -> None:
    fake, watch = _watch(tmp_path, processes, TRINITY_RESTART_INTENSITY="1",
                   TRINITY_RESTART_PERIOD="600")
    fake.set("controller", processes.hung())
    _age(watch.path, 3600)
    first = watch.check()
    assert first is not None and first.kind == "agent_restarted"
    new = first.details["new_pid"]
    os.kill(new, signal.SIGSTOP)  # the new controller hangs too
    wait_for(lambda: psutil.Process(new).status() == psutil.STATUS_STOPPED, 5, "SIGSTOP")
    fake.set("controller", new)  # an hour old, never touched the file
    limit = watch.check()
    assert limit is not None and limit.kind == "restart_intensity_exceeded"
    assert limit.severity == "critical" and limit.details["pid"] == new
    assert watch.check() is None and len(fake.restarted) == 1  # alerted once, no restart
    os.kill(new, signal.SIGCONT)
    watch.path.touch()  # its loop runs again
    assert watch.check() is None
    assert "controller" not in watch.policy.escalated


def test_the_controller_touches_its_alive_file_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "controller.alive"
    alive = AliveFile(path)
    alive.touch()
    first = path.stat().st_mtime_ns
    os.utime(path, ns=(first - 10**9, first - 10**9))
    alive.touch()  # within the second: not touched again
    assert path.stat().st_mtime_ns == first - 10**9
    alive._next = 0.0
    alive.touch()
    assert path.stat().st_mtime_ns >= first


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_the_controller_deadline_is_validated(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="TRINITY_CONTROLLER_DEADLINE"):
        _settings(tmp_path, TRINITY_CONTROLLER_DEADLINE=value)
