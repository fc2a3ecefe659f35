"""Self-healing: the restart policy on a fake clock and a fake supervisord (with real
processes standing in for agents: stopped, exited, a zombie). End to end under a real
supervisord (a SIGSTOPped agent is restarted, repeated hangs hit the limit) is
tests/system/test_healing.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.controller.conftest import FakeSupervisord, Processes
from trinity.controller.process.healing import (
    ASLEEP_ALLOWANCE_S,
    CHECK_EVERY_S,
    Healer,
    RestartIntensity,
)
from trinity.controller.process.heartbeats import HeartbeatMonitor
from trinity.controller.process.rules import Alert
from trinity.controller.supervision.supervisord import SupervisorClient
from trinity.errors import ConfigError
from trinity.settings import Settings

AGENTS = ("witness", "architect", "executor")
DEADLINE_S = 3.0
GRACE_S = 30.0


class Watch:
    """The controller's part in healing on a fake clock: a tick every 0.1 s, each one
    marking newly silent agents and then healing (what Controller.tick does)."""

    STEP_S = 0.1

    def __init__(self, fake: FakeSupervisord | None, *, intensity: int = 5,
                 period_s: float = 30.0, grace_s: float = GRACE_S) -> None:
        self.fake = fake
        self.monitor = HeartbeatMonitor(AGENTS, DEADLINE_S, 0.0, startup_grace_s=grace_s)
        self.healer = Healer(fake, RestartIntensity(intensity, period_s), grace_s, DEADLINE_S,
                             stall_s=1.0)
        self.now = 0.0
        self.healer.heal(self.monitor, 0.0)

    def beat(self, agent: str, pid: int) -> bool:
        return self.monitor.beat(agent, {"agent": agent, "pid": pid}, self.now)

    def beat_all(self, pids: dict[str, int]) -> None:
        for agent in AGENTS:
            self.beat(agent, pids.get(agent, 1))

    def until(self, end: float, *, stalled: bool = False) -> list[Alert]:
        """Tick up to ``end``; ``stalled``: the controller did nothing until then."""
        steps = int(round((end - self.now) / self.STEP_S))
        times = [end] if stalled else [self.now + k * self.STEP_S for k in range(1, steps + 1)]
        alerts: list[Alert] = []
        for now in times:
            self.now = round(now, 6)
            self.monitor.newly_silent(self.now)
            alerts += self.healer.heal(self.monitor, self.now)
        return alerts


# -- the intensity window -------------------------------------------------------------


def test_intensity_is_a_sliding_window_per_agent() -> None:
    policy = RestartIntensity(5, 30.0)
    for t in range(5):
        assert policy.allows("witness", float(t))
        policy.record("witness", float(t))
    assert not policy.allows("witness", 5.0)
    assert not policy.allows("witness", 29.9)
    assert policy.allows("architect", 5.0)  # counted per agent
    assert policy.in_period("witness", 29.9) == 5
    assert policy.allows("witness", 30.0)  # the restart at t=0 has left the window
    assert policy.in_period("witness", 30.0) == 4
    assert policy.in_period("witness", 34.0) == 0


def test_escalation_holds_until_rearmed() -> None:
    policy = RestartIntensity(1, 60.0)
    policy.record("witness", 0.0)
    policy.escalate("witness")
    assert not policy.allows("witness", 100.0)  # window empty, still escalated
    policy.rearm("witness")
    assert policy.allows("witness", 100.0)


def test_intensity_zero_never_restarts(processes: Processes,
                                       caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeSupervisord(processes)
    with caplog.at_level(logging.WARNING, logger="trinity.controller.process.healing"):
        watch = Watch(fake, intensity=0)
    assert "self-healing is off: TRINITY_RESTART_INTENSITY=0" in caplog.text
    pid = processes.hung()
    fake.set("witness", pid)
    watch.beat_all({"witness": pid})
    assert watch.until(10.0) == []
    assert watch.monitor.agents["witness"].silent
    assert not fake.asked and fake.restarted == []


# -- which silent agent is hung ---------------------------------------------------------


def test_a_stopped_agent_is_restarted_once_with_a_fresh_grace(processes: Processes) -> None:
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    pid = processes.hung()
    fake.set("witness", pid)
    watch.beat_all({"witness": pid})
    assert watch.until(DEADLINE_S) == []  # at the deadline, not past it
    (alert,) = watch.until(DEADLINE_S + 0.5)
    assert alert.kind == "agent_restarted" and alert.severity == "warning"
    assert alert.agent == "witness"
    new_pid = fake.info["witness"]["pid"]
    assert fake.restarted == [("witness", pid)]
    assert alert.details["pid"] == pid and alert.details["new_pid"] == new_pid != pid
    assert alert.details["process_status"] == "stopped"
    assert alert.details["silent_s"] == pytest.approx(DEADLINE_S + watch.STEP_S)  # first tick
    assert alert.details["restarts_in_period"] == 1
    assert alert.details["intensity"] == 5 and alert.details["period_s"] == 30.0
    assert f"pid {new_pid}" in alert.message and "restart 1 of at most 5" in alert.message
    # The new process has the startup grace: not silent, not restarted, until it is over.
    health = watch.monitor.agents["witness"]
    assert not health.silent and health.restarting and not health.responsive
    assert watch.until(DEADLINE_S + 0.1 + GRACE_S + DEADLINE_S) == []
    assert not health.silent and len(fake.restarted) == 1
    # Its first heartbeat is a recovery.
    assert watch.beat("witness", new_pid) is True
    assert health.responsive and watch.beat("witness", new_pid) is False


@pytest.mark.parametrize("state", ["EXITED", "BACKOFF", "STARTING", "STOPPED", "FATAL"])
def test_an_agent_supervisord_does_not_call_running_is_left_to_it(
        processes: Processes, state: str) -> None:
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    pid = processes.hung()
    watch.beat_all({"witness": pid})
    fake.set("witness", pid, statename=state)
    assert watch.until(10.0) == []
    assert fake.asked["witness"] == 7  # once a second from 3.1 s on
    assert fake.restarted == []


def test_a_dead_or_zombie_process_is_not_hung(processes: Processes) -> None:
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    zombie = processes.zombie()
    gone = processes.spawn()
    gone.kill()
    gone.wait()
    watch.beat_all({"witness": zombie, "architect": gone.pid})
    fake.set("witness", zombie)
    fake.set("architect", gone.pid)
    fake.set("executor", 0)  # supervisord RUNNING without a pid: nothing to restart
    assert watch.until(10.0) == []
    assert fake.restarted == []


def test_a_new_process_that_has_not_beaten_gets_its_start_allowance(
        processes: Processes) -> None:
    """supervisord restarted WITNESS after a crash: the new pid has not beaten yet and is
    loading its models. It is hung only once it has run for grace + deadline."""
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    old = processes.spawn().pid
    watch.beat_all({"witness": old})
    fake.set("witness", processes.hung(), uptime_s=GRACE_S)
    assert watch.until(10.0) == []
    assert fake.asked["witness"] == 7  # one look a second, from 3.1 s on
    fake.info["witness"]["start"] -= DEADLINE_S + 1  # now past its allowance
    (alert,) = watch.until(10.0 + CHECK_EVERY_S)
    assert alert.kind == "agent_restarted"
    assert alert.details["process_status"] == "stopped"
    assert fake.asked["witness"] == 8


def test_silence_counts_only_while_the_controller_watches(processes: Processes) -> None:
    """The controller itself held up (SIGSTOPped with the agents, or waiting on a locked
    journal): the heartbeats it could not read are no evidence. Once it ticks again an
    agent must stay silent a whole deadline before it is restarted."""
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    pids = {agent: processes.hung() for agent in AGENTS}
    for agent, pid in pids.items():
        fake.set(agent, pid)
    watch.beat_all(pids)
    assert watch.until(20.0, stalled=True) == []
    assert all(h.silent for h in watch.monitor.agents.values())  # alerted, not restarted
    assert watch.until(20.0 + DEADLINE_S - watch.STEP_S) == []
    watch.beat_all(pids)  # they were only waiting on the controller
    assert watch.until(25.0) == []
    # An agent that stays silent once the controller watches again is restarted.
    assert watch.until(40.0, stalled=True) == []
    alerts: list[Alert] = []
    for at in (42.0, 43.1):
        watch.beat("witness", pids["witness"])
        watch.beat("architect", pids["architect"])
        alerts += watch.until(at)
    (alert,) = alerts
    assert alert.agent == "executor" and alert.kind == "agent_restarted"
    assert alert.details["silent_s"] == pytest.approx(43.1 - 22.9)
    assert fake.restarted == [("executor", pids["executor"])]


def test_a_process_asleep_in_a_system_call_gets_the_lock_wait_allowance(
        processes: Processes) -> None:
    """An agent blocked on a database lock sleeps in SQLite's busy wait and gives up after
    the 10 s busy timeout: it is hung only once silent past the deadline plus that wait.
    A stopped one (SIGSTOP) is hung at the deadline."""
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    asleep = processes.asleep()  # `sleep`: asleep in a system call, like a lock wait
    stopped = processes.hung()
    fake.set("witness", asleep)
    fake.set("architect", stopped)
    watch.beat_all({"witness": asleep, "architect": stopped})
    (first,) = watch.until(DEADLINE_S + watch.STEP_S)
    assert first.agent == "architect" and first.details["process_status"] == "stopped"
    # WITNESS, asleep, gets up to the deadline plus the allowance: it beats after 11 s.
    assert watch.until(11.0) == []
    watch.beat("witness", asleep)
    watch.until(14.0)
    watch.beat("witness", asleep)
    assert watch.until(14.0 + DEADLINE_S + ASLEEP_ALLOWANCE_S - 0.5) == []
    # One check to count its main thread's wake-ups, one more to see them not move.
    (second,) = watch.until(14.0 + DEADLINE_S + ASLEEP_ALLOWANCE_S + 2.0)
    assert second.agent == "witness" and second.details["process_status"] == "sleeping"
    assert second.details["silent_s"] > DEADLINE_S + ASLEEP_ALLOWANCE_S


def test_a_silent_agent_whose_loop_still_runs_is_unreachable_not_restarted(
        processes: Processes) -> None:
    """Heartbeats that do not arrive from a process whose main thread keeps waking up (as
    an agent's loop polls its socket) mean a cut link, not a hang: one agent_unreachable
    alert, no restart. A process that never wakes (``sleep``) is restarted."""
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    polling = subprocess.Popen([sys.executable, "-c",
                                "import time\nwhile True: time.sleep(0.02)"])
    processes.started.append(polling)
    asleep = processes.asleep()
    fake.set("witness", polling.pid)
    fake.set("architect", asleep)
    time.sleep(0.3)  # in its loop
    watch.beat_all({"witness": polling.pid, "architect": asleep})
    alerts = []
    for step in range(40):  # a check every fake second, with real time for the loop to run
        alerts += watch.until(DEADLINE_S + 0.5 + step * 0.5)
        time.sleep(0.05)
    assert sorted(a.kind for a in alerts) == ["agent_restarted", "agent_unreachable"], alerts
    (cut,) = [a for a in alerts if a.kind == "agent_unreachable"]
    assert cut.agent == "witness" and cut.details["pid"] == polling.pid
    assert fake.restarted == [("architect", asleep)]  # alerted once, never restarted
    assert polling.poll() is None
    watch.beat("witness", polling.pid)  # the link is back


def test_heal_stopped_restarts_only_stopped_agents_and_ignores_the_stall_guard(
        processes: Processes) -> None:
    """What the controller does while it waits on the journal's write lock: it reads no
    heartbeat, so only a stopped process counts as hung (the likely lock holder)."""
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    stopped, asleep = processes.hung(), processes.asleep()
    fake.set("witness", stopped)
    fake.set("architect", asleep)
    watch.beat_all({"witness": stopped, "architect": asleep})
    assert watch.until(2.0) == []
    assert watch.healer.heal_stopped(watch.monitor, 2.5) == []  # within its deadline
    # The controller stalled for 10 s on the lock: heal() waits a deadline, this does not.
    assert watch.healer.heal(watch.monitor, 12.5) == []
    (alert,) = watch.healer.heal_stopped(watch.monitor, 12.6)
    assert alert.agent == "witness" and alert.kind == "agent_restarted"
    assert alert.details["reason"] == "stopped while the journal was locked"
    assert fake.restarted == [("witness", stopped)]
    assert watch.healer.heal_stopped(watch.monitor, 14.0) == []  # ARCHITECT is only asleep


@pytest.mark.timeout(60)
def test_the_controller_restarts_a_stopped_agent_that_holds_the_journal_lock(
        short_dir: Path, processes: Processes) -> None:
    """An agent stopped (SIGSTOP) inside a journal transaction holds the write lock: the
    controller's own writes fail after the 10 s busy timeout, and then it restarts the
    stopped process (here a stand-in holding the lock), which frees the journal."""
    from trinity.bus.journal import Journal
    from trinity.contract import ALERTS
    from trinity.controller.process.controller import Controller
    from trinity.errors import JournalError
    from trinity.stores import runs

    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_METRICS_PORT": "0"})
    journal = Journal(settings.messages_db, source="test")
    runs.create_run(journal.conn, {"time_scale": 60.0, "duration_h": 24.0,
                                   "event_interval_min": 30.0, "budget_usd": 2.0})
    controller = Controller(settings)
    controller.initialize()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "conn.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(600)",
         str(settings.messages_db)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        os.kill(holder.pid, signal.SIGSTOP)
        fake = FakeSupervisord(processes)
        fake.set("architect", holder.pid)
        controller.healer = Healer(fake, RestartIntensity(5, 30.0), settings.startup_grace_s,
                                   settings.heartbeat_deadline_s, stall_s=1.0)
        controller.monitor.beat("architect", {"pid": holder.pid}, time.monotonic())
        started = time.monotonic()
        for _ in range(5):  # BaseProcess.run's loop, until a turn gets through
            try:
                controller.loop()
                break
            except (JournalError, sqlite3.Error) as exc:
                controller._database_failed(exc)
        took = time.monotonic() - started
        assert fake.restarted == [("architect", holder.pid)]
        assert holder.wait(5) == -signal.SIGKILL
        journaled = [json.loads(m.payload) for m in journal.read_after(ALERTS, 0, 100)]
        (restart,) = [a for a in journaled if a["kind"] == "agent_restarted"]
        assert restart["details"]["reason"] == "stopped while the journal was locked"
        assert restart["details"]["process_status"] == "stopped"
        # The one busy timeout (10 s), then at once: not two, not one per alert.
        assert 10.0 <= took < 16.0, took
        print(f"\nstopped lock holder restarted {took:.1f} s after the controller met the lock")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
        controller.shutdown()
        journal.close()


def test_supervisord_unreachable_is_logged_and_retried(
        processes: Processes, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeSupervisord(processes)
    watch = Watch(fake)
    pid = processes.hung()
    watch.beat_all({"witness": pid})
    fake.set("witness", pid)
    fake.unreachable = True
    with caplog.at_level(logging.ERROR, logger="trinity.controller.process.healing"):
        assert watch.until(5.0) == []
    assert "connection refused" in caplog.text
    fake.unreachable = False
    fake.failure = "startProcess: SPAWN_ERROR"
    (alert,) = watch.until(6.0)
    assert alert.kind == "agent_restart_failed" and alert.severity == "error"
    assert "SPAWN_ERROR" in alert.message and alert.details["pid"] == pid
    # Left STOPPED by the failed attempt: supervisord would not start it, so healing does.
    fake.failure = None
    (alert,) = watch.until(7.0)
    assert alert.kind == "agent_restarted"
    assert alert.details["restarts_in_period"] == 2  # the failed attempt counts
    assert fake.restarted == [("witness", 0)]
    assert watch.until(8.0) == []


# -- the limit ----------------------------------------------------------------------------


def test_hanging_past_the_intensity_escalates_once_and_stops_restarting(
        processes: Processes) -> None:
    fake = FakeSupervisord(processes)
    watch = Watch(fake, intensity=1, period_s=60.0)
    pid = processes.hung()
    fake.set("witness", pid)
    watch.beat_all({"witness": pid})
    (first,) = watch.until(4.0)
    assert first.kind == "agent_restarted"
    new_pid = fake.info["witness"]["pid"]
    assert watch.beat("witness", new_pid) is True
    os.kill(new_pid, signal.SIGSTOP)  # the new process hangs too
    wait_for(lambda: psutil.Process(new_pid).status() == psutil.STATUS_STOPPED, 5,
             "SIGSTOP")  # seen running, it would get one more check (cut off or hung?)
    (second,) = watch.until(8.0)
    assert second.kind == "restart_intensity_exceeded" and second.severity == "critical"
    assert second.details["restarts_in_period"] == 1 and second.details["pid"] == new_pid
    assert "not restarting it until it sends a heartbeat" in second.message
    assert watch.until(20.0) == []  # alerted once
    # It beats again (SIGCONT): re-armed; a hang within the period escalates again.
    watch.beat("witness", new_pid)
    (third,) = watch.until(24.0)
    assert third.kind == "restart_intensity_exceeded"
    # Not restarted until it beats, even once the restart has left the window.
    assert watch.until(100.0) == []
    assert len(fake.restarted) == 1
    watch.beat("witness", new_pid)
    (fourth,) = watch.until(104.0)
    assert fourth.kind == "agent_restarted"
    assert len(fake.restarted) == 2


def test_five_restarts_in_thirty_seconds_then_the_alert(processes: Processes) -> None:
    """The default intensity: a storm of hangs is restarted five times, then escalated."""
    fake = FakeSupervisord(processes)
    watch = Watch(fake, grace_s=0.0)
    fake.set("executor", processes.hung())
    watch.beat_all({"executor": fake.info["executor"]["pid"]})
    kinds = []
    while watch.now < 40.0:
        kinds += [a.kind for a in watch.until(watch.now + 1.0) if a.agent == "executor"]
        os.kill(fake.info["executor"]["pid"], signal.SIGSTOP)  # each new process hangs
        fake.info["executor"]["start"] -= 100  # and is past its start allowance
    assert kinds == ["agent_restarted"] * 5 + ["restart_intensity_exceeded"]
    assert len(fake.restarted) == 5


# -- not under supervisord ------------------------------------------------------------------


def test_without_supervisord_healing_is_off_and_says_so_once(
        processes: Processes, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERVISOR_SERVER_URL", raising=False)
    assert SupervisorClient.from_env({}) is None
    assert SupervisorClient.from_env({"SUPERVISOR_SERVER_URL": "unix:///x/s.sock"}) is not None
    with caplog.at_level(logging.WARNING, logger="trinity.controller.process.healing"):
        healer = Healer.from_settings(Settings.from_env({"TRINITY_DATA_DIR": "/tmp"}))
        monitor = HeartbeatMonitor(AGENTS, DEADLINE_S, 0.0)
        monitor.beat("witness", {"pid": processes.hung()}, 0.0)
        for t in range(50):
            monitor.newly_silent(t / 5)
            assert healer.heal(monitor, t / 5) == []
    off = [r for r in caplog.records if "self-healing is off" in r.getMessage()]
    assert len(off) == 1 and "SUPERVISOR_SERVER_URL" in off[0].getMessage()


@pytest.mark.parametrize(("env", "says"), [
    ({"TRINITY_RESTART_INTENSITY": "-1"}, "TRINITY_RESTART_INTENSITY"),
    ({"TRINITY_RESTART_INTENSITY": "2.5"}, "TRINITY_RESTART_INTENSITY"),
    ({"TRINITY_RESTART_PERIOD": "0"}, "TRINITY_RESTART_PERIOD"),
    ({"TRINITY_RESTART_PERIOD": "nan"}, "TRINITY_RESTART_PERIOD"),
])
def test_restart_settings_are_validated(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Settings.from_env({"TRINITY_DATA_DIR": "/tmp", **env})
    settings = Settings.from_env({"TRINITY_DATA_DIR": "/tmp", "TRINITY_RESTART_INTENSITY": "0",
                                  "TRINITY_RESTART_PERIOD": "60"})
    assert (settings.restart_intensity, settings.restart_period_s) == (0, 60.0)
