"""What ``trinity run`` and ``trinity status`` do: prepare a run, drive supervisord, report."""

from __future__ import annotations

import os
import platform
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal
from trinity.clock import now_ms
from trinity.contract import CONTROLLER, Alert
from trinity.controller.ops import after_run
from trinity.controller.process import scenario
from trinity.controller.process.alerts import journal_alert
from trinity.controller.reports import criteria, persistence
from trinity.controller.supervision.supervisord import Supervisor
from trinity.controller.supervision.watchdog import alive_path
from trinity.db import reading
from trinity.errors import ConfigError
from trinity.settings import Settings
from trinity.stores import costs as costs_store
from trinity.stores import journal as journal_store
from trinity.stores import run_logs, runs
from trinity.stores.costs import summarize
from trinity.stores.run_logs import read_alerts


def _run_config(settings: Settings) -> dict[str, Any]:
    return {
        "time_scale": settings.time_scale,
        "duration_h": settings.duration_h,
        "event_interval_min": settings.event_interval_min,
        "data_dir": str(settings.data_dir),
        "log_dir": str(settings.log_dir),
        "budget_usd": settings.budget_usd,
        "budget_mode": settings.budget_mode,
        "snapshot_interval_min": settings.snapshot_interval_min,
        "metrics_interval_min": settings.metrics_interval_min,
        "scenario_seed": settings.scenario_seed,
        "noise_events": settings.noise_events,
        "scenario": str(settings.scenario_path) if settings.scenario_path else None,
    }


def start(settings: Settings, config: Path, *, resume: bool, detach: bool,
          restart_at_h: float | None = None) -> int:
    sup = Supervisor(config)
    if sup.is_running():
        print(f"supervisord is already running for {sup.here}; "
              "see 'supervisorctl -c supervisor.conf status' or run 'make stop' first")
        return 1
    preflight(settings)
    if settings.scenario_path is not None and not resume:
        try:
            scenario.read_scenario(settings.scenario_path)
        except scenario.ScenarioDataError as exc:
            raise ConfigError(f"TRINITY_SCENARIO: {exc}") from None
    journal = Journal(settings.messages_db, source="cli")
    try:
        run = runs.resume_run(journal.conn) if resume else runs.create_run(
            journal.conn, _run_config(settings))
    finally:
        journal.close()
    if not resume:
        archived = run_logs.archive(settings.log_dir)
        if archived is not None:
            print(f"the previous run's logs and snapshots moved to {archived}")
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    write_test_config(settings, run, config, resumed=resume)
    sup.start()
    verb = "resumed" if resume else "started"
    print(f"run {run.run_id} {verb}: {run.total_events} events over {run.config['duration_h']} "
          f"simulated hours at time scale {run.time_scale:g}; logs in {settings.log_dir}")
    if detach:
        print(f"supervisord is running; 'supervisorctl -c {config} status' shows the programs")
        if settings.tag_repo is not None:
            print("TRINITY_TAG_REPO: a detached run is not followed to its end, so it is "
                  "not tagged")
        return 0
    try:
        final, restart_ok = _follow(settings, run, sup, restart_at_h)
    finally:
        sup.stop()
    code = _summarize(settings, final)
    if restart_at_h is not None and not restart_ok:
        print(f"the restart at simulated hour {restart_at_h:g} "
              f"{'did not happen' if restart_ok is None else 'lost state (see above)'}")
        code = 1
    return after_run.conclude(settings, final, code, config)


def preflight(settings: Settings) -> None:
    """What the programs would otherwise find out only once started, each checked where
    its resource is opened: the bus's keys, and Firestore's credentials when it is the
    pattern store's record. ConfigError says what is wrong."""
    BusConfig.of(settings).check()
    if settings.pattern_backend == "firestore":
        from trinity.stores.patterns.firestore import check_credentials

        check_credentials(settings.firestore_emulator_host)


def write_test_config(settings: Settings, run: runs.Run, config: Path, *, resumed: bool) -> Path:
    """``test_config.json``: the run's effective configuration, secrets redacted."""
    from trinity.redaction import withhold_secrets
    from trinity.urls import redact_url

    path = settings.log_dir / run_logs.TEST_CONFIG
    earlier = run_logs.read_json(path) or {}
    resumes = earlier.get("resumed_ms", []) if earlier.get("run_id") == run.run_id else []
    env = withhold_secrets({name: value for name, value in sorted(os.environ.items())
                            if name.startswith("TRINITY_")})
    if env.get("TRINITY_ALERT_WEBHOOK"):  # withheld above; its scheme and host are no secret
        env["TRINITY_ALERT_WEBHOOK"] = redact_url(os.environ["TRINITY_ALERT_WEBHOOK"])
    document = {
        "run_id": run.run_id,
        "started_ms": run.started_ms,
        "resumed_ms": [*resumes, now_ms()] if resumed else resumes,
        "run": run.config,
        "settings": {
            "data_dir": str(settings.data_dir), "log_dir": str(settings.log_dir),
            "heartbeat_interval_s": settings.heartbeat_interval_s,
            "heartbeat_max_missed": settings.heartbeat_max_missed,
            "max_payload_bytes": settings.max_payload_bytes,
            "metrics_port": settings.metrics_port,
            "routing": str(settings.routing_path) if settings.routing_path else "built-in",
            "alert_webhook": redact_url(settings.alert_webhook) if settings.alert_webhook
            else None,
        },
        "environment": env,
        "secrets": {name: "set (redacted)" if os.environ.get(name) else "not set"
                    for name in ("OPENAI_API_KEY",)},
        "supervisor_config": str(config.resolve()),
        "versions": {"python": platform.python_version(), **_versions()},
    }
    run_logs.write_json(path, document, durable=True)
    return path


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("trinity", "pyzmq", "supervisor", "llama_cpp_python", "faiss-cpu",
                 "genai-prices"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def _follow(settings: Settings, run: runs.Run, sup: Supervisor,
            restart_at_h: float | None) -> tuple[runs.Run, bool | None]:
    """Wait for the run to end, with a progress bar; restart once at ``restart_at_h``.

    Returns the ended run and whether persistence held across the restart (None: none)."""
    restart_ok: bool | None = None
    journal = Journal(settings.messages_db, source="cli")
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[sim]}"), TimeElapsedColumn()) as bar:
            task = bar.add_task("events with an outcome", total=run.total_events, sim="")
            while True:
                state = runs.progress(journal.conn, run.run_id)
                current = runs.get_run(journal.conn, run.run_id)
                assert current is not None
                bar.update(task, completed=state["completed"],
                           sim=f"simulated {current.sim_elapsed_s / 3600:5.2f} h")
                if current.status != runs.ACTIVE:
                    return current, restart_ok
                if (restart_at_h is not None and restart_ok is None
                        and current.sim_elapsed_s >= restart_at_h * 3600):
                    bar.console.print(f"simulated hour {current.sim_elapsed_s / 3600:.2f}: "
                                      "kill -9 of every process, then --resume")
                    problems = kill_and_resume(settings, sup, echo=bar.console.print)
                    restart_ok = not problems
                time.sleep(0.25)
    finally:
        journal.close()


def kill_and_resume(settings: Settings, sup: Supervisor, *, wait_s: float = 5.0,
                    echo: Callable[[str], None] = print) -> list[str]:
    """The plan's hour-12 check: capture the state, kill -9 supervisord and every program,
    wait, start again with ``--resume`` and validate persistence; returns the problems."""
    before = persistence.capture(settings)
    persistence.save_before(settings, before)
    _record_deliberate_kill(settings, before)
    killed = sup.kill_all()
    echo(f"killed {len(killed)} processes (pids {', '.join(map(str, killed))}); "
         f"waiting {wait_s:g} s")
    time.sleep(wait_s)
    journal = Journal(settings.messages_db, source="cli")
    try:
        run = runs.resume_run(journal.conn)
    finally:
        journal.close()
    write_test_config(settings, run, sup.config, resumed=True)
    sup.start()
    echo(f"run {run.run_id} resumed at simulated {run.sim_elapsed_s / 3600:.2f} h "
         f"(cycle {before['last_cycle']} done before the kill)")
    state, problems = persistence.validate(settings, before)
    criteria.save_after(settings, problems, state)
    for line in format_validation(problems):
        echo(line)
    return problems


def _record_deliberate_kill(settings: Settings, state: dict[str, Any]) -> None:
    """Journaled before the kill: the report counts exits after it as deliberate."""
    alert = Alert.of(
        "deliberate_restart", "info",
        f"kill -9 of every process at simulated {state['sim_elapsed_s'] / 3600:.2f} h "
        "(kill-and-resume), then --resume",
        alert_id=f"deliberate_restart/{state['run_id']}/{state['captured_ms']}",
        run_id=state["run_id"], last_cycle=state["last_cycle"])
    journal_alert(settings.messages_db, alert.in_run(state["run_id"], state["sim_elapsed_s"]),
                  source="cli")


def format_validation(problems: list[str]) -> list[str]:
    if not problems:
        return ["persistence: OK (patterns, costs, cycle position and queues restored)"]
    return ["persistence: FAILED", *(f"  - {p}" for p in problems)]


def _summarize(settings: Settings, run: runs.Run) -> int:
    with reading(settings.messages_db) as conn:
        state = runs.progress(conn, run.run_id)
        per_event = sum(n > 1 for n in Counter(
            o.event_id for o in runs.outcomes(conn, run.run_id)).values())
        dead = journal_store.dead_letter_count(conn)
    alerts = [a for a in read_alerts(settings.log_dir / run_logs.ALERTS_LOG)
              if a.get("run_id") in (None, run.run_id)]
    external = (f" (and {state['external']} external events, {state['external_completed']}"
                " with their outcome)" if state["external"] else "")
    print(f"run {run.run_id} {run.status}: {state['emitted']} events emitted, "
          f"{state['completed']} with their outcome, {per_event} with more than one{external}; "
          f"{dead} dead letters; {len(alerts)} alerts")
    try:
        print(format_costs(costs(settings, run.run_id)))
    except ConfigError as exc:
        print(exc)
    ok = run.status == runs.COMPLETED and state["completed"] == state["emitted"] and per_event == 0
    try:
        _, measured = criteria.evaluate(settings, run.run_id)
    except sqlite3.Error as exc:
        print(f"cannot evaluate the success criteria: {exc}")
        return 1
    for line in criteria.format_table(measured):
        print(line)
    passed = criteria.mandatory_passed(measured)
    print(f"mandatory criteria: {'all passed' if passed else 'FAILED'}")
    return 0 if ok and passed else 1


def status(settings: Settings, config: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"data_dir": str(settings.data_dir), "supervisord": "not running"}
    try:
        sup = Supervisor(config)
        if sup.is_running():
            report["supervisord"] = "running"
            report["programs"] = sup.states()
    except Exception as exc:  # status must answer even with a broken config
        report["supervisord"] = f"unknown ({exc})"
    try:  # the controller's loop, as the watchdog sees it (controller/supervision/watchdog.py)
        age = time.time() - alive_path(settings).stat().st_mtime
        report[CONTROLLER] = {"loop_age_s": round(age, 1), "alive":
                              age <= settings.controller_deadline_s
                              and report.get("programs", {}).get(CONTROLLER) == "RUNNING"}
    except OSError:
        pass  # no controller has run here yet
    if not settings.messages_db.exists():
        report["run"] = None
        return report
    with reading(settings.messages_db) as conn:
        run = runs.latest_run(conn)
        if run is not None:
            report["run"] = {
                "run_id": run.run_id, "status": run.status,
                "sim_elapsed_s": run.sim_elapsed_s,
                "real_elapsed_s": round(time.time() - run.started_ms / 1000, 1),
                "total_cycles": run.total_cycles,
                "total_events": run.total_events,
                "time_scale": run.time_scale,
                **runs.progress(conn, run.run_id),
            }
        report["queues"] = {
            f"{b.stream}->{b.consumer}": b.pending for b in journal_store.backlogs(conn)
        }
        beats = runs.heartbeats(conn)
    now_ms = time.time() * 1000
    report["agents"] = {
        b.agent: {"pid": b.pid, "last_heartbeat_age_s": round((now_ms - b.last_ms) / 1000, 1),
                  "alive": (now_ms - b.last_ms) / 1000 <= settings.heartbeat_deadline_s
                  and report.get("programs", {}).get(b.agent, "RUNNING") == "RUNNING"
                  and report["supervisord"] == "running"}
        for b in beats
    }
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
                 f"{run['total_cycles']}, {run['completed']}/{run['emitted']} events with "
                 f"outcome, simulated {run['sim_elapsed_s'] / 3600:.2f} h, real "
                 f"{run['real_elapsed_s'] / 3600:.2f} h (time scale {run['time_scale']:g})")
    if run.get("external"):
        lines.append(f"external events (trinity emit): {run['external_completed']}/"
                     f"{run['external']} with outcome")
    lines.append("queues (pending):")
    lines += [f"  {name:<32} {pending}" for name, pending in report.get("queues", {}).items()]
    if CONTROLLER in report:
        loop = report[CONTROLLER]
        lines.append(f"controller loop: {'alive' if loop['alive'] else 'NOT ALIVE'}, last ran "
                     f"{loop['loop_age_s']} s ago")
    lines.append("agents (last heartbeat):")
    lines += [f"  {name:<12} {'alive' if a['alive'] else 'NOT ALIVE':<9} pid {a['pid']}  "
              f"{a['last_heartbeat_age_s']} s ago"
              for name, a in report.get("agents", {}).items()]
    return "\n".join(lines)



def costs(settings: Settings, run_id: str | None) -> dict[str, Any]:
    """Ledger totals for ``run_id`` (None: the latest run; "all": every call)."""
    if run_id is None:
        if settings.messages_db.exists():
            with reading(settings.messages_db) as conn:
                latest = runs.latest_run(conn)
            run_id = latest.run_id if latest else "all"
        else:
            run_id = "all"
    if not settings.costs_db.exists():
        raise ConfigError(f"no cost ledger at {settings.costs_db} (no model call made yet)")
    with reading(settings.costs_db) as conn:
        totals = summarize(costs_store.calls(conn, None if run_id == "all" else run_id))
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
