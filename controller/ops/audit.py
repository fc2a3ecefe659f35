"""An independent audit of one run, read from the stores alone: was anything lost or done twice?

Nothing here trusts a counter a process kept. Each event the controller recorded (and
each external event ``trinity emit`` journaled during the run) is followed through the
durable records that must hold a trace of it, all of them written in the same
transaction as the step they record:

* the pattern store: WITNESS's detection of the event (a pattern, or none);
* the ``outcomes`` table: what the event ended in: ``<event>/no_pattern`` when WITNESS
  found none, ``<event>/plan`` when ARCHITECT's plan failed, otherwise one outcome per
  task of the plan, ``<event>/t1`` .. ``<event>/tN``;
* the journal: what each consumer has not yet applied (the controller prunes applied
  messages, so the journal proves only what is still pending; tasks still in it are
  compared with the outcomes too);
* the cost ledger: one request per model call the pipeline had to make.

An event never detected, a detected pattern without any outcome, a gap in the task
numbers, a task the journal holds without its outcome, and a message a consumer never
applied are **lost**. A second detection, outcomes of two kinds for one event (no
pattern and tasks, a failed plan and tasks) are **duplicated**.

For the ledger, the calls the pipeline made are the requests its records imply
(``architect:<event>`` per detected pattern, ``executor:<task>`` per task outcome): a
ledger row for a request no record implies is a *row without a call*, an implied
request without a row is a *call without a row*, and more than one successful row
for one request is a call *paid twice* (a replay must reuse the stored answer).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from trinity.contract import (
    ARCHITECT,
    EXECUTION,
    EXECUTOR,
    failed_plan_id,
    no_pattern_id,
    request_id,
)
from trinity.db import reading
from trinity.settings import Settings
from trinity.stores import costs, runs
from trinity.stores import journal as journal_store
from trinity.stores import patterns as pattern_store
from trinity.stores.costs import SUCCESS

SHOWN = 5  # ids listed per problem in the text form


@dataclass
class Audit:
    run_id: str
    events_emitted: int = 0
    outcomes_recorded: int = 0
    events_with_outcome: int = 0
    patterns_detected: int = 0
    task_outcomes: int = 0
    external_events: int = 0  # from trinity emit during the run, followed like the rest
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    ledger_rows: int = 0
    requests: int = 0
    rows_without_call: list[str] = field(default_factory=list)
    calls_without_row: list[str] = field(default_factory=list)
    paid_twice: list[str] = field(default_factory=list)
    dead_letters: int = 0

    @property
    def passed(self) -> bool:
        return not (self.lost or self.duplicated or self.rows_without_call
                    or self.calls_without_row or self.paid_twice)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def lines(self) -> list[str]:
        def listed(ids: list[str]) -> str:
            more = f", ... ({len(ids) - SHOWN} more)" if len(ids) > SHOWN else ""
            return f"{len(ids)}" + (f"  ({', '.join(ids[:SHOWN])}{more})" if ids else "")

        return [
            f"audit of run {self.run_id} (from the journal, the pattern store and the ledger):",
            f"  events emitted              {self.events_emitted}"
            + (f" (and {self.external_events} external)" if self.external_events else ""),
            f"  outcomes recorded           {self.outcomes_recorded} "
            f"({self.events_with_outcome} events with an outcome)",
            f"  patterns / task outcomes    {self.patterns_detected} / {self.task_outcomes}",
            f"  lost                        {listed(self.lost)}",
            f"  duplicated                  {listed(self.duplicated)}",
            f"  ledger rows                 {self.ledger_rows} for {self.requests} requests",
            f"  ledger rows without a call  {listed(self.rows_without_call)}",
            f"  calls without a ledger row  {listed(self.calls_without_row)}",
            f"  calls paid twice            {listed(self.paid_twice)}",
            f"  dead letters                {self.dead_letters}",
            f"  audit: {'PASSED' if self.passed else 'FAILED'}",
        ]


def _journaled_tasks(conn: sqlite3.Connection, run_id: str) -> set[str]:
    """Task ids of the run still in the journal (not yet pruned)."""
    found = set()
    for payload in journal_store.journaled_payloads(conn, EXECUTION):
        try:
            body = json.loads(payload)
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("run_id") == run_id and isinstance(
                body.get("task_id"), str):
            found.add(body["task_id"])
    return found


def audit_run(settings: Settings, run_id: str) -> Audit:
    """Follow every event of ``run_id`` through the stores (all opened read-only)."""
    result = Audit(run_id)
    with reading(settings.messages_db) as journal:
        events = [e.event_id for e in sorted(runs.events(journal, run_id),
                                             key=lambda e: (e.cycle, e.noise))]
        external = [e.event_id for e in runs.external_events(journal, run_id)]
        outcomes: dict[str, set[str]] = defaultdict(set)
        for outcome in runs.outcomes(journal, run_id):
            outcomes[outcome.event_id].add(outcome.task_id)
        journaled = _journaled_tasks(journal, run_id)
        result.lost += [f"{b.stream}->{b.consumer}: {b.pending} messages never applied"
                        for b in journal_store.backlogs(journal) if b.pending > 0]
        result.dead_letters = journal_store.dead_letter_count(journal)
    detections = _detections(settings, run_id)
    result.events_emitted = len(events)
    result.external_events = len(external)
    result.outcomes_recorded = sum(len(v) for v in outcomes.values())
    result.events_with_outcome = sum(bool(outcomes.get(e)) for e in events + external)
    implied: set[str] = set()
    for event_id in events + external:
        detected = detections.get(event_id, [])
        done = outcomes.get(event_id, set())
        tasks = {t for t in done if t.rsplit("/", 1)[1].startswith("t")}
        lost, duplicated = _follow(event_id, detected, done, tasks,
                                   {t for t in journaled if t.startswith(f"{event_id}/")})
        result.lost += lost
        result.duplicated += duplicated
        if detected and detected[0] is not None:
            result.patterns_detected += 1
            implied.add(request_id(ARCHITECT, event_id))
        result.task_outcomes += len(tasks)
        implied |= {request_id(EXECUTOR, t) for t in tasks}
    _ledger(settings, run_id, implied, result)
    return result


def _detections(settings: Settings, run_id: str) -> dict[str, list[str | None]]:
    """Each event's decisions (a list, so that two would show: the store keeps one)."""
    if not settings.patterns_db.exists():
        return {}
    with reading(settings.patterns_db) as conn:
        return {e: [d.pattern] for e, d in pattern_store.run_decisions(conn, run_id).items()}


def _follow(event_id: str, detected: list[str | None], outcomes: set[str], tasks: set[str],
            journaled: set[str]) -> tuple[list[str], list[str]]:
    """(lost, duplicated) findings for one event."""
    lost: list[str] = []
    duplicated: list[str] = []
    if not detected:
        return [f"{event_id} (never detected by WITNESS)"], []
    if len(detected) > 1:
        duplicated.append(f"{event_id} (detected {len(detected)} times)")
    no_pattern, plan = no_pattern_id(event_id), failed_plan_id(event_id)
    if detected[0] is None:
        if no_pattern not in outcomes:
            lost.append(f"{event_id} (no pattern, but no outcome)")
        if outcomes - {no_pattern}:
            duplicated.append(f"{event_id} (no pattern, yet {sorted(outcomes - {no_pattern})})")
        return lost, duplicated
    if no_pattern in outcomes:
        duplicated.append(f"{event_id} (a pattern, and a no-pattern outcome)")
    if plan in outcomes and tasks:
        duplicated.append(f"{event_id} (a failed plan, and {len(tasks)} task outcomes)")
    if plan not in outcomes and not tasks:
        lost.append(f"{event_id} (a pattern, but no plan outcome and no task outcome)")
    numbers = sorted(int(t.rsplit("/t", 1)[1]) for t in tasks
                     if t.rsplit("/t", 1)[-1].isdigit())
    if numbers and numbers != list(range(1, numbers[-1] + 1)):
        lost.append(f"{event_id} (task outcomes {numbers}: a gap)")
    lost += [f"{t} (a journaled task without an outcome)" for t in sorted(journaled - outcomes)]
    return lost, duplicated


def _ledger(settings: Settings, run_id: str, implied: set[str], result: Audit) -> None:
    rows: list[tuple[str, str]] = []
    if settings.costs_db.exists():
        with reading(settings.costs_db) as conn:
            rows = [(c["request_id"], c["status"]) for c in costs.calls(conn, run_id)]
    requests = {r for r, _ in rows}
    successes = Counter(r for r, status in rows if status == SUCCESS)
    result.ledger_rows = len(rows)
    result.requests = len(requests)
    result.rows_without_call = sorted(requests - implied)
    result.calls_without_row = sorted(implied - requests)
    result.paid_twice = sorted(r for r, n in successes.items() if n > 1)
