"""``trinity chaos``: a compressed run under a seeded chaos monkey, then an independent audit.

The monkey runs in this (foreground) process, outside supervisord. Its faults are drawn
from one seed before the run starts: which process, which kind, and when, as a point
of the simulated day. The default time scale (288: 24 hours in 5 minutes) leaves the
agents idle part of the time, so the run keeps to its clock and the faults land at
random points of it, some during a model call and some between two; a run so
compressed that the work lags the clock would see its faults crowd the first part of
the work.

* ``kill``: ``kill -9`` of a random Trinity program (controller included). The monkey
  first waits until the program has been RUNNING for :data:`MIN_UP_S` (a process killed
  sooner counts as a failed start for supervisord's ``startretries``), reads the pattern
  store, journals a ``chaos_kill`` alert naming the pid (so the exit that follows is
  deliberate, not a crash: see :func:`trinity.controller.reports.criteria.unexpected_exits`),
  kills, waits for supervisord's restart and reads the pattern store again. The counts
  may grow, never shrink.
* ``stop``: SIGSTOP of a random agent for 1–8 s, then SIGCONT: longer than the
  heartbeat deadline, it is silent; the controller alerts (and may restart it).

After the run: the audit (:mod:`trinity.controller.ops.audit`) reads the stores, and the
plan's criteria are measured as for any run. Exit 0 only when every planned fault
happened, every killed program came back, no pattern count shrank, the audit found
nothing lost or duplicated and every mandatory criterion passed. Everything goes to
``chaos_audit.json`` in the run's log folder too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xmlrpc.client import Fault as XmlRpcFault

from trinity.contract import AGENTS, PROGRAMS, Alert
from trinity.controller.ops import run as runner
from trinity.controller.ops.audit import audit_run
from trinity.controller.process.alerts import journal_alert
from trinity.controller.reports import criteria, persistence
from trinity.controller.supervision.supervisord import Supervisor
from trinity.db import open_readonly
from trinity.errors import ConfigError
from trinity.settings import Settings
from trinity.stores import runs

MIN_UP_S = 2.0  # supervisord's startsecs is 1: a program up this long is past its start
BACK_TIMEOUT_S = 90.0
STOP_RANGE_S = (1.0, 8.0)
MARKER = ".trinity-chaos"  # a folder holding it may be wiped by the next chaos run
AUDIT_FILE = "chaos_audit.json"
KILL, STOP = "kill", "stop"


@dataclass(frozen=True)
class Fault:
    at_fraction: float  # of the run's simulated duration
    kind: str
    target: str
    stop_s: float = 0.0


@dataclass
class Done:
    """What one fault did."""

    kind: str
    target: str
    at_fraction: float
    completed: int
    sim_elapsed_s: float
    pid: int | None = None
    new_pid: int | None = None
    back_after_s: float | None = None
    stop_s: float = 0.0
    patterns_before: dict[str, Any] = field(default_factory=dict)
    patterns_after: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


def plan_faults(seed: int, kills: int, stops: int) -> list[Fault]:
    """The run's faults, from ``seed`` alone, ordered by when they happen."""
    rng = random.Random(seed)
    faults = [Fault(round(rng.uniform(0.02, 0.9), 4), KILL, rng.choice(PROGRAMS))
              for _ in range(kills)]
    faults += [Fault(round(rng.uniform(0.05, 0.85), 4), STOP, rng.choice(AGENTS),
                     round(rng.uniform(*STOP_RANGE_S), 2)) for _ in range(stops)]
    return sorted(faults, key=lambda f: f.at_fraction)


def shrunk(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Pattern counts that went down from ``before`` to ``after``."""
    found = [f"{key} {before[key]} -> {after.get(key, 0)}" for key in ("exemplars", "detections")
             if after.get(key, 0) < before.get(key, 0)]
    found += [f"{name} detections {n} -> {after.get('by_pattern', {}).get(name, 0)}"
              for name, n in before.get("by_pattern", {}).items()
              if after.get("by_pattern", {}).get(name, 0) < n]
    return found


class Monkey:
    def __init__(self, settings: Settings, sup: Supervisor, run_id: str,
                 echo: Any = print) -> None:
        self.settings = settings
        self.sup = sup
        self.run_id = run_id
        self.echo = echo
        self.done: list[Done] = []

    def _info(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.sup.call("getProcessInfo", name))
        except (OSError, XmlRpcFault):
            return None

    def _ready_pid(self, name: str, timeout_s: float = BACK_TIMEOUT_S,
                   not_pid: int | None = None) -> tuple[int | None, float]:
        """Wait until ``name`` is RUNNING (as a pid other than ``not_pid``) and has been up
        :data:`MIN_UP_S`; returns (pid or None on timeout, seconds waited)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            info = self._info(name)
            if info and info["statename"] == "RUNNING" and info["pid"] != not_pid and (
                    info["now"] - info["start"] >= MIN_UP_S):
                return int(info["pid"]), time.monotonic() - start
            time.sleep(0.1)
        return None, time.monotonic() - start

    def _patterns(self) -> dict[str, Any]:
        try:
            return persistence.pattern_counts(self.settings.patterns_db)
        except sqlite3.Error as exc:
            return {"error": str(exc)}

    def _progress(self) -> tuple[int, runs.Run]:
        """(events with an outcome, the run as last checkpointed)."""
        conn = open_readonly(self.settings.messages_db)
        try:
            run = runs.get_run(conn, self.run_id)
            assert run is not None
            return runs.progress(conn, self.run_id)["completed"], run
        finally:
            conn.close()

    def _mark(self, kind: str, name: str, pid: int, sim_s: float, **details: Any) -> None:
        """Journal the fault before doing it: the exit it causes is deliberate."""
        alert = Alert.of(f"chaos_{kind}", "info",
                         f"chaos monkey: {'kill -9' if kind == KILL else 'SIGSTOP'} of "
                         f"{name} (pid {pid})", agent=name,
                         alert_id=f"chaos_{kind}/{self.run_id}/{name}/{pid}/{time.time_ns()}",
                         pid=pid, **details)
        journal_alert(self.settings.messages_db, alert.in_run(self.run_id, sim_s),
                      source="chaos")

    def apply(self, fault: Fault, completed: int, sim_s: float) -> Done:
        done = Done(fault.kind, fault.target, fault.at_fraction, completed, sim_s,
                    stop_s=fault.stop_s)
        pid, _ = self._ready_pid(fault.target)
        if pid is None:
            done.problem = f"{fault.target} was not RUNNING within {BACK_TIMEOUT_S:g} s"
            return done
        done.pid = pid
        if fault.kind == KILL:
            done.patterns_before = self._patterns()
            self._mark(KILL, fault.target, pid, sim_s)
            os.kill(pid, signal.SIGKILL)
            new_pid, waited = self._ready_pid(fault.target, not_pid=pid)
            done.new_pid, done.back_after_s = new_pid, round(waited, 2)
            done.patterns_after = self._patterns()
            if new_pid is None:
                done.problem = f"{fault.target} did not come back within {BACK_TIMEOUT_S:g} s"
            elif lost := shrunk(done.patterns_before, done.patterns_after):
                done.problem = "pattern store shrank: " + "; ".join(lost)
        else:
            self._mark(STOP, fault.target, pid, sim_s, stop_s=fault.stop_s)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(fault.stop_s)
            # Gone already if the controller restarted it meanwhile (self-healing).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            info = self._info(fault.target)
            done.new_pid = int(info["pid"]) if info and info["pid"] else None
        return done

    def run(self, faults: list[Fault], timeout_s: float) -> str:
        """Apply ``faults`` as the run progresses; returns the run's final status."""
        deadline = time.monotonic() + timeout_s
        pending = list(faults)
        while time.monotonic() < deadline:
            completed, run = self._progress()
            if run.status != runs.ACTIVE:
                return run.status
            if pending and run.sim_elapsed_s >= pending[0].at_fraction * run.duration_s:
                done = self.apply(pending.pop(0), completed, run.sim_elapsed_s)
                self.done.append(done)
                self.echo(describe(len(self.done), len(faults), done, run.total_events))
                continue
            time.sleep(0.1)
        return "timed out"


def describe(n: int, of: int, done: Done, total: int) -> str:
    head = (f"[{n}/{of}] {done.completed}/{total} events done, simulated "
            f"{done.sim_elapsed_s / 3600:5.2f} h: ")
    if done.kind == KILL:
        text = (f"kill -9 {done.target} (pid {done.pid}); back as pid {done.new_pid} after "
                f"{done.back_after_s} s; exemplars {done.patterns_before.get('exemplars')} -> "
                f"{done.patterns_after.get('exemplars')}, detections "
                f"{done.patterns_before.get('detections')} -> "
                f"{done.patterns_after.get('detections')}")
    else:
        text = (f"SIGSTOP {done.target} (pid {done.pid}) for {done.stop_s} s"
                + ("" if done.new_pid == done.pid else f"; restarted as pid {done.new_pid}"))
    return head + text + (f"  PROBLEM: {done.problem}" if done.problem else "")


def prepare_folder(folder: Path, config: Path) -> None:
    """An empty folder for the run (a previous chaos run's is emptied), with the config."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise ConfigError(
                f"{folder} is not empty and holds no earlier chaos run ({MARKER}); "
                "give an empty or new folder with --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by trinity chaos; emptied by the next one\n")
    shutil.copy(config, folder / "supervisor.conf")


def chaos(folder: Path, config: Path, *, duration_h: float, time_scale: float, kills: int,
          stops: int, seed: int, timeout_s: float) -> int:
    prepare_folder(folder, config)
    os.environ["TRINITY_DATA_DIR"] = str(folder)
    os.environ.pop("TRINITY_LOG_DIR", None)
    os.environ.pop("TRINITY_RUN_DIR", None)
    settings = Settings.from_env(duration_h=duration_h, time_scale=time_scale)
    faults = plan_faults(seed, kills, stops)
    print(f"chaos: {kills} kills and {stops} stops (seed {seed}) over a {duration_h:g}-hour "
          f"run at time scale {time_scale:g}, in {folder}", flush=True)
    sup = Supervisor(folder / "supervisor.conf")
    if runner.start(settings, sup.config, resume=False, detach=True) != 0:
        return 1
    conn = open_readonly(settings.messages_db)
    try:
        run = runs.latest_run(conn)
    finally:
        conn.close()
    assert run is not None
    monkey = Monkey(settings, sup, run.run_id)
    started = time.monotonic()
    try:
        status = monkey.run(faults, timeout_s)
    finally:
        sup.stop()
    print(f"the run ended {status} after {time.monotonic() - started:.0f} s", flush=True)
    return verdict(settings, run.run_id, status, faults, monkey.done)


def verdict(settings: Settings, run_id: str, status: str, faults: list[Fault],
            done: list[Done]) -> int:
    audit = audit_run(settings, run_id)
    _, measured = criteria.evaluate(settings, run_id)
    problems = [f"{d.kind} of {d.target}: {d.problem}" for d in done if d.problem]
    if len(done) < len(faults):
        problems.append(f"only {len(done)} of {len(faults)} faults happened before the run "
                        "ended: give it a lower --time-scale (more real time per fault)")
    if status != runs.COMPLETED:
        problems.append(f"the run ended {status}")
    kills = [d for d in done if d.kind == KILL]
    back = [d.back_after_s for d in kills if d.back_after_s is not None and d.new_pid]
    stops = [d for d in done if d.kind == STOP]
    healed = sum(d.new_pid not in (None, d.pid) for d in stops)
    print(f"faults: {len(kills)} kills ("
          + ", ".join(f"{p} x{sum(d.target == p for d in kills)}" for p in PROGRAMS)
          + f"), {len(stops)} stops ({healed} restarted by the controller); killed programs "
          "back after "
          + (f"{min(back):.1f}-{max(back):.1f} s (mean {sum(back) / len(back):.1f} s)"
             if back else "-"))
    for line in audit.lines():
        print(line)
    for line in criteria.format_table(measured):
        print(line)
    passed = criteria.mandatory_passed(measured)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    ok = audit.passed and passed and not problems
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    (settings.log_dir / AUDIT_FILE).write_text(json.dumps({
        "run_id": run_id, "status": status, "passed": ok,
        "faults": [asdict(d) for d in done], "planned": len(faults),
        "audit": audit.as_dict(), "criteria": criteria.as_dicts(measured),
        "problems": problems}, indent=2) + "\n", encoding="utf-8")
    print(f"chaos: {'PASSED' if ok else 'FAILED'} (details in "
          f"{settings.log_dir / AUDIT_FILE})")
    return 0 if ok else 1
