"""Storage faults on real files: each gives a clear alert or error, loses nothing, and the
system recovers once the fault is gone.

* A corrupt journal at start (garbage bytes, a truncated file): every process says so in
  one line naming the file and what to do, and waits (no traceback, no restart loop);
  restoring the backup lets each go on with the run it had. No controller can be alive
  to alert then: the journal is what alerts travel through.
* A corrupt pattern store and cost ledger at start: database_error alerts from the
  controller and from each agent that cannot start (its heartbeat says why); moved away
  (never by Trinity itself: they hold what WITNESS learned and what calls cost), the
  run goes on and ends with every event handled once.
* A full disk (a small tmpfs holding the stores): database_error "database or disk is
  full" alerts (written to alerts.log directly, as the journal cannot take them), the
  events wait, and once space is freed the backlog drains, each event handled once.
* A cost ledger held by another process (BEGIN EXCLUSIVE) past the 10 s busy timeout:
  a database_error alert, the model calls retried, then every event handled once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents.models.servers import OK, Fault, FaultServer
from tests.conftest import BIN, Project, wait_for
from tests.system.test_alert_rules import _wait_for_agents
from trinity.bus.journal import Journal
from trinity.process import STARTUP_RETRY_S
from trinity.settings import Settings
from trinity.stores import runs
from trinity.stores.run_logs import read_alerts

GARBAGE = bytes(range(256)) * 64  # 16 KiB that are not a database


def alerts_of(log: Path, kind: str, agent: str | None = None) -> list[dict[str, Any]]:
    return [a for a in read_alerts(log)
            if a.get("kind") == kind and agent in (None, a.get("agent"))]


def start_run(project: Project, *args: str) -> sqlite3.Connection:
    """``trinity run --detach ARGS``; the journal, once the three agents beat."""
    result = project.trinity("run", "--detach", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    db = sqlite3.connect(Path(project.env["TRINITY_DATA_DIR"]) / "trinity_messages.db",
                         timeout=30)
    _wait_for_agents(project, db)
    return db


def _status(db: sqlite3.Connection) -> str:
    return str(db.execute("SELECT status FROM runs ORDER BY started_ms DESC").fetchone()[0])


def assert_each_event_handled_once(db: sqlite3.Connection, data_dir: Path, events: int,
                                   also: list[str] | None = None) -> None:
    """The finished run: each event (of the run, and ``also`` those emitted beside it)
    has one outcome and one detection, no pattern counted twice, nothing dead-lettered,
    and each model request one successful ledger row."""
    assert _status(db) == "completed"
    per_event = dict(db.execute(
        "SELECT e.event_id, count(o.task_id) FROM events e LEFT JOIN outcomes o"
        " USING(event_id) GROUP BY e.event_id"))
    assert len(per_event) == events, per_event
    for event_id in also or []:
        per_event[event_id] = db.execute("SELECT count(*) FROM outcomes WHERE event_id=?",
                                         (event_id,)).fetchone()[0]
    assert set(per_event.values()) == {1}, per_event
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    patterns = sqlite3.connect(data_dir / "trinity_patterns.db")
    costs = sqlite3.connect(data_dir / "trinity_costs.db")
    try:
        assert {e for (e,) in patterns.execute("SELECT event_id FROM detections")} == set(
            per_event)
        counted = patterns.execute("SELECT sum(detections) FROM patterns").fetchone()[0]
        assert counted == patterns.execute(
            "SELECT count(*) FROM detections WHERE pattern IS NOT NULL").fetchone()[0]
        per_request = costs.execute(
            "SELECT request_id, sum(status='success') FROM calls GROUP BY request_id").fetchall()
        assert per_request and {n for _, n in per_request} == {1}, per_request
    finally:
        patterns.close()
        costs.close()


# -- a corrupt journal at start -----------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(GARBAGE)
    else:
        with path.open("r+b") as fh:
            fh.truncate(path.stat().st_size // 2)


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            lines.append({"msg": line, "level": "RAW"})
    return lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_journal_at_start_is_one_line_and_waits_for_the_backup(
        short_dir: Path, damage: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRINITY_", "SUPERVISOR_"))}
    env.update({"TRINITY_DATA_DIR": str(short_dir), "TRINITY_METRICS_PORT": "0"})
    settings = Settings.from_env(env)
    journal = Journal(settings.messages_db, source="test")
    run = runs.create_run(journal.conn, {"time_scale": 60.0, "duration_h": 24.0,
                                         "event_interval_min": 30.0, "budget_usd": 2.0})
    for n in range(200):  # a journal of some size, so half of it is a truncated file
        journal.conn.execute("INSERT INTO dead_letters(created_ms, consumer, reason, size)"
                             " VALUES (0, 'test', ?, 0)", ("x" * 200 + str(n),))
    journal.close()
    backup = short_dir / "backup.db"
    shutil.copy(settings.messages_db, backup)
    _damage(settings.messages_db, damage)

    procs: dict[str, subprocess.Popen[bytes]] = {}
    stderr = {name: short_dir / f"{name}.err" for name in ("controller", "architect")}
    try:
        for name, args in (("controller", ["controller"]), ("architect", ["agent", "architect"])):
            with stderr[name].open("wb") as err:
                procs[name] = subprocess.Popen([str(BIN / "trinity"), *args], env=env,
                                               cwd=short_dir, stderr=err)
        for name in procs:
            wait_for(lambda name=name: "cannot start" in stderr[name].read_text(), 30,
                     f"{name} to say it cannot start")
        time.sleep(2 * STARTUP_RETRY_S + 0.5)  # two more attempts, said nothing more
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited"
            text = stderr[name].read_text()
            assert "Traceback" not in text, text
            (error,) = [e for e in _log_lines(stderr[name]) if e["level"] != "INFO"]
            assert error["level"] == "ERROR", error
            message = error["msg"]
            assert message.startswith(f"{name} cannot start: cannot open journal "
                                      f"{settings.messages_db}: "), message
            assert ("file is not a database" if damage == "garbage"
                    else "database disk image is malformed") in message
            assert "restore it from a backup, or move it away" in message
            assert "\n" not in message

        os.replace(backup, settings.messages_db)
        for name in procs:
            wait_for(lambda name=name: f"{name} started" in stderr[name].read_text(),
                     2 * STARTUP_RETRY_S + 20, f"{name} to start once the backup is back")
        assert f"continuing run {run.run_id}" in stderr["controller"].read_text()
        db = sqlite3.connect(settings.messages_db, timeout=30)
        wait_for(lambda: db.execute("SELECT count(*) FROM agents WHERE name='architect'"
                                    ).fetchone()[0] == 1, 20, "ARCHITECT's heartbeat")
        assert db.execute("SELECT status FROM runs").fetchone()[0] == "active"
        db.close()
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=20) for name, proc in procs.items()}
    assert codes == {"controller": 0, "architect": 0}


# -- a corrupt pattern store and cost ledger at start ---------------------------------------


@pytest.mark.timeout(150)
def test_corrupt_pattern_store_and_ledger_at_start_are_alerted_then_moved_away(
        project: Project) -> None:
    patterns_db, costs_db = project.root / "trinity_patterns.db", project.root / "trinity_costs.db"
    patterns_db.write_bytes(GARBAGE)
    costs_db.write_bytes(GARBAGE[::-1])
    db = start_run(project, "--duration", "2", "--time-scale", "360")
    pids = {p["name"]: p["pid"] for p in project.supervisor().process_info()}
    log = project.alerts_log

    def by() -> dict[tuple[str, str], dict[str, Any]]:
        return {(a["agent"], a["details"]["database"]): a
                for a in alerts_of(log, "database_error")}

    # The controller reads both stores too (budget, cost and pattern snapshots).
    expected = {("controller", "trinity_costs.db"), ("controller", "trinity_patterns.db"),
                ("witness", "trinity_patterns.db"), ("architect", "trinity_costs.db"),
                ("executor", "trinity_costs.db")}
    wait_for(lambda: expected <= by().keys(), 30, f"database_error alerts {expected}")
    alerts = by()
    assert alerts.keys() == expected, alerts.keys()
    for (agent, database), alert in alerts.items():
        message = alert["message"]
        assert alert["severity"] == "error"
        assert "file is not a database" in alert["details"]["error"], alert
        assert message.startswith(f"{database}: "), message
        if agent != "controller":
            assert f"(while {agent} was starting): " in message, message
        assert alert["details"]["advice"].startswith("restore it from a backup, or move it "
                                                     "away to start an empty"), alert
    # The agents wait (beating, so neither supervisord nor the controller restarts them)
    # while the run's events queue up for WITNESS.
    wait_for(lambda: db.execute("SELECT count(*) FROM events").fetchone()[0] >= 2, 30,
             "events emitted meanwhile")
    assert db.execute("SELECT count(*) FROM outcomes").fetchone()[0] == 0
    assert {p["name"]: p["pid"] for p in project.supervisor().process_info()} == pids
    said = [e for e in _log_lines(project.root / "logs" / "24h_test" / "trinity.log")
            if "cannot start" in str(e.get("msg"))]
    assert sorted(e["process"] for e in said) == ["architect", "executor", "witness"], said
    assert not any("Traceback" in str(e.get("exc", "")) for e in said)

    for store in (patterns_db, costs_db):  # an operator moves them away
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{store}{suffix}").exists():
                os.replace(f"{store}{suffix}", f"{store}{suffix}.corrupt")
    wait_for(lambda: _status(db) != "active", 120, "the run to end")
    assert_each_event_handled_once(db, project.root, 4)
    assert len(alerts_of(log, "database_error")) == 5  # one each: alerts repeat once a minute
    for kind in ("agent_crashed", "agent_fatal", "agent_restarted", "agent_silent"):
        assert alerts_of(log, kind) == [], kind
    assert {p["name"]: p["pid"] for p in project.supervisor().process_info()} == pids
    db.close()


# -- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(short_dir: Path) -> Iterator[Path]:
    """A 32 MB tmpfs (mounting needs root: the CI machine is root; elsewhere skipped)."""
    mount = short_dir / "stores"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs: {(done.stderr or done.stdout).strip()}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(180)
def test_a_full_disk_is_alerted_and_the_backlog_drains_once_space_is_freed(
        project: Project, small_disk: Path) -> None:
    # The stores on the small file system, the logs (alerts.log) outside it.
    project.env["TRINITY_DATA_DIR"] = str(small_disk)
    project.env["TRINITY_LOG_DIR"] = str(project.root / "logs" / "24h_test")
    db = start_run(project, "--duration", "2", "--time-scale", "240", "--event-interval", "20")
    log = project.alerts_log
    wait_for(lambda: db.execute("SELECT count(*) FROM outcomes").fetchone()[0] >= 2, 60,
             "the first outcomes")
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True,
                   check=False)
    assert shutil.disk_usage(small_disk).free < 64 << 10
    full = wait_for(lambda: [a for a in alerts_of(log, "database_error")
                             if "database or disk is full" in a["details"]["error"]], 30,
                    "a database_error alert: disk full")
    assert isinstance(full, list)
    first = full[0]
    assert first["severity"] == "error"
    assert first["details"]["database"] in ("trinity_messages.db", "trinity_patterns.db",
                                            "trinity_costs.db")
    assert first["message"].endswith("free space on its file system; the writes are retried "
                                     "until they succeed"), first["message"]
    time.sleep(5)  # the fault lasts: events wait
    events_while_full = db.execute("SELECT count(*) FROM events").fetchone()[0]
    assert _status(db) == "active"
    filler.unlink()
    wait_for(lambda: _status(db) != "active", 150, "the run to end once space is freed")
    assert_each_event_handled_once(db, small_disk, 6)
    assert events_while_full < 6
    assert alerts_of(log, "agent_crashed") == [] and alerts_of(log, "agent_restarted") == []
    # Alerts raised while the journal could not take them went to alerts.log directly.
    text = (project.root / "logs" / "24h_test" / "trinity.log").read_text()
    assert "cannot journal alert" in text
    db.close()


# -- a locked cost ledger -------------------------------------------------------------------


PLAN = json.dumps({"summary": "Guard the payment processor against a missing charge",
                   "steps": ["check the charge is set", "add a regression test"],
                   "tasks": [{"description": "Return early when the charge is None",
                              "acceptance": "the regression test passes"}]})


@pytest.fixture
def cloud() -> Iterator[FaultServer]:
    server = FaultServer(Fault(OK, content=PLAN, prompt_tokens=100,
                               completion_tokens=100)).start()
    yield server
    server.stop()


@pytest.mark.timeout(150)
def test_a_locked_ledger_is_alerted_retried_and_nothing_is_lost(
        project: Project, cloud: FaultServer) -> None:
    """ARCHITECT's calls go to an OpenAI-compatible server that counts them; another
    process holds the cost ledger (BEGIN EXCLUSIVE) for 12 s, past the 10 s busy timeout."""
    routing = project.root / "routing.toml"
    routing.write_text("""
[call]
timeout_s = 20.0
max_attempts = 1
backoff_s = []

[providers.cloud]
kind = "openai"
model = "gpt-5"
api_key_env = "OPENAI_API_KEY"
base_url_env = "OPENAI_BASE_URL"
price_model = "gpt-5"
price_provider = "openai"

[providers.embedded]
kind = "embedded"
n_ctx = 1024
n_threads = 1

[[routes]]
agents = ["architect"]
chain = ["cloud"]

[[routes]]
chain = ["embedded"]
""")
    project.env.update({"TRINITY_ROUTING": str(routing), "OPENAI_API_KEY": "sk-test",
                        "OPENAI_BASE_URL": cloud.base_url})
    db = start_run(project, "--duration", "2", "--time-scale", "240", "--event-interval", "20")
    log = project.alerts_log
    wait_for(lambda: len(cloud.hits) >= 1, 60, "ARCHITECT's first call")
    pids = {p["name"]: p["pid"] for p in project.supervisor().process_info()}
    # A critical error emitted while the ledger is held: ARCHITECT calls for it then.
    critical = project.root / "critical.jsonl"
    critical.write_text(json.dumps({
        "event_id": "while-locked", "severity": "critical", "file": "payments/stripe.py",
        "message": "Fatal error: NoneType in production payment processing", "line": 142,
        "error_type": "AttributeError"}) + "\n")
    lock = sqlite3.connect(project.root / "trinity_costs.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    try:
        emitted = project.trinity("emit", "--quiet", str(critical))
        assert emitted.returncode == 0, emitted.stdout + emitted.stderr
        wait_for(lambda: alerts_of(log, "database_error", "architect"), 20,
                 "ARCHITECT's database_error alert")
        time.sleep(max(0.0, 12.0 - (time.monotonic() - locked_at)))
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    for alert in alerts_of(log, "database_error"):  # ARCHITECT's, and EXECUTOR's if it wrote
        assert alert["agent"] in ("architect", "executor")
        assert alert["details"]["database"] == "trinity_costs.db", alert
        assert alert["details"]["error"] == "database is locked"
        assert "another connection holds its write lock" in alert["message"]
    wait_for(lambda: _status(db) != "active", 120, "the run to end")
    assert_each_event_handled_once(db, project.root, 6, also=["while-locked"])
    # Not restarted: a process waiting on a lock is asleep, and beats again once SQLite
    # gives up, within the healer's allowance.
    assert {p["name"]: p["pid"] for p in project.supervisor().process_info()} == pids
    for kind in ("agent_crashed", "agent_restarted"):
        assert alerts_of(log, kind) == [], kind
    costs = sqlite3.connect(project.root / "trinity_costs.db")
    recorded = costs.execute("SELECT count(*) FROM calls WHERE provider='cloud'").fetchone()[0]
    costs.close()
    db.close()
    # Every paid call has its row, and none was paid twice: the router keeps an attempt
    # the ledger could not take and records it when the retried message asks again.
    assert recorded == len(cloud.hits)
