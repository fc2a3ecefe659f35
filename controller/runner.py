"""What ``trinity run`` and ``trinity status`` do: prepare a run, drive supervisord, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trinity.bus.journal import Journal
from trinity.controller import runs
from trinity.controller.alerts import read_alerts
from trinity.controller.supervision import Supervisor
from trinity.costs import CostLedger
from trinity.errors import ConfigError
from trinity.settings import Settings


def _run_config(settings: Settings) -> dict[str, Any]:
    return {
        "time_scale": settings.time_scale,
        "duration_h": settings.duration_h,
        "event_interval_min": settings.event_interval_min,
        "data_dir": str(settings.data_dir),
        "log_dir": str(settings.log_dir),
        "budget_usd": settings.budget_usd,
        "budget_mode": settings.budget_mode,
    }


def start(settings: Settings, config: Path, *, resume: bool, detach: bool) -> int:
    sup = Supervisor(config)
    if sup.is_running():
        print(f"supervisord is already running for {sup.here}; "
              "see 'supervisorctl -c supervisor.conf status' or run 'make stop' first")
        return 1
    journal = Journal(settings.messages_db, source="cli")
    try:
        run = runs.resume_run(journal.conn) if resume else runs.create_run(
            journal.conn, _run_config(settings))
    finally:
        journal.close()
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    sup.start()
    verb = "resumed" if resume else "started"
    print(f"run {run.run_id} {verb}: {run.total_cycles} events over {run.config['duration_h']} "
          f"simulated hours at time scale {run.time_scale:g}")
    if detach:
        print(f"supervisord is running; 'supervisorctl -c {config} status' shows the programs")
        return 0
    try:
        final = _follow(settings, run)
    finally:
        sup.stop()
    return _summarize(settings, final)


def _follow(settings: Settings, run: runs.Run) -> runs.Run:
    journal = Journal(settings.messages_db, source="cli")
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as bar:
            task = bar.add_task("events with an outcome", total=run.total_cycles)
            while True:
                state = runs.progress(journal.conn, run.run_id)
                bar.update(task, completed=state["completed"])
                current = runs.get_run(journal.conn, run.run_id)
                assert current is not None
                if current.status != runs.ACTIVE:
                    return current
                time.sleep(0.25)
    finally:
        journal.close()


def _summarize(settings: Settings, run: runs.Run) -> int:
    journal = Journal(settings.messages_db, source="cli")
    try:
        state = runs.progress(journal.conn, run.run_id)
        per_event = journal.conn.execute(
            "SELECT count(*) FROM (SELECT o.event_id FROM outcomes o JOIN events e"
            " USING(event_id) WHERE e.run_id=? GROUP BY o.event_id HAVING count(*) > 1)",
            (run.run_id,),
        ).fetchone()[0]
        dead = len(journal.dead_letters())
    finally:
        journal.close()
    alerts = [a for a in read_alerts(settings.log_dir / "alerts.log")
              if a.get("run_id") in (None, run.run_id)]
    print(f"run {run.run_id} {run.status}: {state['emitted']} events emitted, "
          f"{state['completed']} with their outcome, {per_event} with more than one; "
          f"{dead} dead letters; {len(alerts)} alerts")
    try:
        print(format_costs(costs(settings, run.run_id)))
    except ConfigError as exc:
        print(exc)
    ok = run.status == runs.COMPLETED and state["completed"] == state["emitted"] and per_event == 0
    return 0 if ok else 1


def status(settings: Settings, config: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"data_dir": str(settings.data_dir), "supervisord": "not running"}
    try:
        sup = Supervisor(config)
        if sup.is_running():
            report["supervisord"] = "running"
            report["programs"] = sup.states()
    except Exception as exc:  # status must answer even with a broken config
        report["supervisord"] = f"unknown ({exc})"
    if not settings.messages_db.exists():
        report["run"] = None
        return report
    journal = Journal(settings.messages_db, source="cli")
    try:
        run = runs.latest_run(journal.conn)
        if run is not None:
            report["run"] = {
                "run_id": run.run_id, "status": run.status,
                "sim_elapsed_s": run.sim_elapsed_s,
                "real_elapsed_s": round(time.time() - run.started_ms / 1000, 1),
                "total_cycles": run.total_cycles,
                **runs.progress(journal.conn, run.run_id),
            }
        report["queues"] = {
            f"{b.stream}->{b.consumer}": b.pending for b in journal.backlogs()
        }
        now_ms = time.time() * 1000
        try:
            rows = journal.conn.execute(
                "SELECT name, pid, last_heartbeat_ms FROM agents ORDER BY name").fetchall()
        except Exception:
            rows = []
        report["agents"] = {
            name: {"pid": pid, "last_heartbeat_age_s": round((now_ms - ts) / 1000, 1)}
            for name, pid, ts in rows
        }
    finally:
        journal.close()
    return report


def format_status(report: dict[str, Any]) -> str:
    lines = [f"supervisord: {report['supervisord']}"]
    for name, state in report.get("programs", {}).items():
        lines.append(f"  {name:<12} {state}")
    run = report.get("run")
    if run is None:
        lines.append("no run recorded yet")
        return "\n".join(lines)
    lines.append(f"run {run['run_id']} ({run['status']}): cycle {run['last_cycle']}/"
                 f"{run['total_cycles']}, {run['completed']} events with outcome, "
                 f"simulated {run['sim_elapsed_s'] / 3600:.2f} h")
    lines.append("queues (pending):")
    lines += [f"  {name:<32} {pending}" for name, pending in report.get("queues", {}).items()]
    lines.append("agents (last heartbeat):")
    lines += [f"  {name:<12} pid {a['pid']}  {a['last_heartbeat_age_s']} s ago"
              for name, a in report.get("agents", {}).items()]
    return "\n".join(lines)



def costs(settings: Settings, run_id: str | None) -> dict[str, Any]:
    """Ledger totals for ``run_id`` (None: the latest run; "all": every call)."""
    if run_id is None:
        if settings.messages_db.exists():
            journal = Journal(settings.messages_db, source="cli")
            try:
                latest = runs.latest_run(journal.conn)
            finally:
                journal.close()
            run_id = latest.run_id if latest else "all"
        else:
            run_id = "all"
    if not settings.costs_db.exists():
        raise ConfigError(f"no cost ledger at {settings.costs_db} (no model call made yet)")
    ledger = CostLedger(settings.costs_db)
    try:
        totals = ledger.totals(None if run_id == "all" else run_id)
    finally:
        ledger.close()
    return {"run_id": run_id, **totals}


def format_costs(report: dict[str, Any]) -> str:
    share = report["local_share_calls"]
    rate = report["success_rate"]
    lines = [
        f"model calls ({report['run_id']}): {report['total_calls']} attempts for "
        f"{report['requests']} requests, ${report['total_cost_usd']:.4f}, success rate "
        f"{'-' if rate is None else f'{rate:.1%}'}, local "
        f"{'-' if share is None else f'{share:.1%}'} of calls",
    ]
    for title in ("by_agent", "by_provider", "by_model"):
        lines.append(f"  {title.replace('_', ' ')}:")
        lines += [f"    {name:<24} {g['calls']:>5} calls  ${g['cost_usd']:.4f}  "
                  f"{g['input_tokens']:>8} in / {g['output_tokens']:>7} out tokens"
                  for name, g in report[title].items()]
    return "\n".join(lines)
