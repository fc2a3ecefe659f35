"""The chaos monkey's plan and the audit that judges a chaos run, on real SQLite stores.

The monkey itself runs in ``make chaos`` (CI runs its short form); here: its faults are
reproducible from the seed, a shrinking pattern store is caught, deliberate kills are
told from crashes, and the audit finds each kind of loss and duplication it claims to.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.controller.process.test_snapshots import _call, _patterns_db, _run_with_events
from trinity.clock import now_ms
from trinity.contract import PROGRAMS, Alert
from trinity.controller.ops.audit import Audit, audit_run
from trinity.controller.ops.chaos import KILL, STOP, plan_faults, prepare_folder, shrunk
from trinity.controller.reports import criteria
from trinity.settings import Settings
from trinity.stores.costs import CostLedger


@pytest.fixture
def settings(short_dir: Path) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})


def test_the_faults_come_from_the_seed_alone() -> None:
    faults = plan_faults(7, kills=50, stops=4)
    assert faults == plan_faults(7, kills=50, stops=4)
    assert faults != plan_faults(8, kills=50, stops=4)
    assert sum(f.kind == KILL for f in faults) == 50
    assert sum(f.kind == STOP for f in faults) == 4
    assert [f.at_fraction for f in faults] == sorted(f.at_fraction for f in faults)
    assert all(0 < f.at_fraction < 0.95 for f in faults)
    assert {f.target for f in faults if f.kind == KILL} == set(PROGRAMS)  # models too
    assert all(f.target != "controller" and f.stop_s >= 1 for f in faults if f.kind == STOP)


def test_a_shrinking_pattern_store_is_reported() -> None:
    before = {"exemplars": 10, "detections": 4, "by_pattern": {"flaky_test": 2}}
    assert shrunk(before, {"exemplars": 11, "detections": 5,
                           "by_pattern": {"flaky_test": 2, "duplication": 1}}) == []
    found = shrunk(before, {"exemplars": 9, "detections": 4, "by_pattern": {}})
    assert found == ["exemplars 10 -> 9", "flaky_test detections 2 -> 0"]


def test_only_the_exits_of_deliberate_kills_are_expected() -> None:
    alerts = [
        Alert.of("chaos_kill", "info", "kill", agent="witness", pid=101).payload(),
        Alert.of("agent_crashed", "critical", "exit", agent="witness", pid="101").payload(),
        Alert.of("agent_crashed", "critical", "exit", agent="witness", pid="102").payload(),
        Alert.of("agent_crashed", "critical", "exit", agent="architect", pid="101").payload(),
        Alert.of("agent_fatal", "critical", "gave up", agent="witness").payload(),
        Alert.of("restart_intensity_exceeded", "critical", "hung", agent="executor",
                 pid=7).payload(),
        Alert.of("agent_restarted", "warning", "restarted", agent="executor", pid=7).payload(),
    ]
    unexpected = criteria.unexpected_exits(alerts)
    assert [(a["kind"], a["agent"], a["details"].get("pid")) for a in unexpected] == [
        ("agent_crashed", "witness", "102"), ("agent_crashed", "architect", "101"),
        ("agent_fatal", "witness", None), ("restart_intensity_exceeded", "executor", 7)]


def _outcome(conn: sqlite3.Connection, task_id: str, event_id: str, run_id: str,
             delegate: str = "QualityEnforcer") -> None:
    conn.execute("INSERT INTO outcomes(task_id, event_id, run_id, delegate, status, recorded_ms)"
                 " VALUES (?, ?, ?, ?, 'done', ?)", (task_id, event_id, run_id, delegate,
                                                     now_ms()))


def _consistent_run(settings: Settings) -> tuple[str, list[str]]:
    """Four events: two with a one-task plan, one with no pattern, one failed plan."""
    journal, run = _run_with_events(settings, 4)
    events = [f"{run.run_id}/c{c:03d}" for c in range(1, 5)]
    with journal.transaction() as tx:
        tx.advance_cursor("witness", "telemetry_stream", 4)
        _outcome(tx.conn, f"{events[0]}/t1", events[0], run.run_id)
        _outcome(tx.conn, f"{events[1]}/t1", events[1], run.run_id)
        _outcome(tx.conn, f"{events[2]}/no_pattern", events[2], run.run_id, "witness")
        _outcome(tx.conn, f"{events[3]}/plan", events[3], run.run_id, "architect")
    journal.close()
    _patterns_db(settings, run.run_id, {events[0]: "flaky_test", events[1]: "duplication",
                                        events[2]: None, events[3]: "critical_error"})
    ledger = CostLedger(settings.costs_db)
    requests = [("architect", events[0], None), ("architect", events[1], None),
                ("architect", events[3], None), ("executor", events[0], f"{events[0]}/t1"),
                ("executor", events[1], f"{events[1]}/t1")]
    for n, (agent, event_id, task_id) in enumerate(requests):
        call = _call(run.run_id, n, agent=agent, event_id=event_id, task_id=task_id)
        ledger.record(call.__class__(**{**call.__dict__, "request_id":
                                        f"{agent}:{task_id or event_id}"}))
    ledger.close()
    return run.run_id, events


def test_a_consistent_run_passes_the_audit(settings: Settings) -> None:
    run_id, _ = _consistent_run(settings)
    audit = audit_run(settings, run_id)
    assert audit.passed, audit.lines()
    assert (audit.events_emitted, audit.outcomes_recorded, audit.events_with_outcome) == (4, 4, 4)
    assert (audit.patterns_detected, audit.task_outcomes) == (3, 2)
    assert (audit.ledger_rows, audit.requests) == (5, 5)


def _sql(path: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def _audit_after(settings: Settings, change: str) -> Audit:
    run_id, events = _consistent_run(settings)
    e1, e2, e3, e4 = events
    changes = {
        "outcome lost": (settings.messages_db, "DELETE FROM outcomes WHERE task_id=?",
                         f"{e1}/t1"),
        "no-pattern outcome beside tasks": (
            settings.messages_db, "INSERT INTO outcomes VALUES (?, ?, ?, 'witness', 'no_pattern',"
            " 0, NULL)", f"{e1}/no_pattern", e1, run_id),
        "task gap": (settings.messages_db, "UPDATE outcomes SET task_id=? WHERE task_id=?",
                     f"{e2}/t2", f"{e2}/t1"),
        "never detected": (settings.patterns_db, "DELETE FROM detections WHERE event_id=?", e3),
        "never applied": (settings.messages_db,
                          "UPDATE cursors SET seq=2 WHERE consumer='witness'"),
        "ledger row without a call": (
            settings.costs_db, "UPDATE calls SET request_id='architect:elsewhere'"
            " WHERE request_id=?", f"architect:{e4}"),
        "paid twice": (settings.costs_db, "INSERT INTO calls SELECT 'again', request_id, 2,"
                       " route, ts_ms, sim_elapsed_s, run_id, agent, provider, provider_kind,"
                       " model, local, input_tokens, output_tokens, cached_tokens,"
                       " reasoning_tokens, tokens_estimated, cost_usd, latency_ms, status,"
                       " error_class, error, event_id, task_id FROM calls WHERE request_id=?",
                       f"architect:{e1}"),
    }
    path, sql, *params = changes[change]
    _sql(path, sql, *params)
    return audit_run(settings, run_id)


# A lost task outcome also leaves its executor call without the record that implies it.
@pytest.mark.parametrize(("change", "findings"), [
    ("outcome lost", ["lost", "rows_without_call"]),
    ("no-pattern outcome beside tasks", ["duplicated"]),
    ("task gap", ["lost", "rows_without_call", "calls_without_row"]),
    ("never detected", ["lost"]),
    ("never applied", ["lost"]),
    ("ledger row without a call", ["rows_without_call", "calls_without_row"]),
    ("paid twice", ["paid_twice"]),
])
def test_the_audit_finds_each_kind_of_fault(settings: Settings, change: str,
                                            findings: list[str]) -> None:
    audit = _audit_after(settings, change)
    assert not audit.passed
    found = [name for name in ("lost", "duplicated", "rows_without_call", "calls_without_row",
                               "paid_twice") if getattr(audit, name)]
    assert found == findings, audit.lines()


def test_the_chaos_folder_is_only_emptied_if_a_chaos_run_made_it(tmp_path: Path) -> None:
    config = tmp_path / "supervisor.conf"
    config.write_text("[supervisord]\n")
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "trinity_patterns.db").write_bytes(b"learned")
    with pytest.raises(Exception, match="not empty"):
        prepare_folder(mine, config)
    assert (mine / "trinity_patterns.db").read_bytes() == b"learned"
    folder = tmp_path / "chaos"
    prepare_folder(folder, config)
    (folder / "trinity_messages.db").write_bytes(b"old run")
    prepare_folder(folder, config)
    assert sorted(p.name for p in folder.iterdir()) == [".trinity-chaos", "supervisor.conf"]
