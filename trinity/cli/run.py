"""Running the 24-hour test: ``trinity run``, ``stop``, ``status``, ``kill-and-resume``,
``validate-persistence``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trinity.cli.common import config_option, load_settings, reported, setting_option
from trinity.settings import BUDGET_MODES


@click.command()
@setting_option("--duration", "duration_h", float)
@setting_option("--time-scale", "time_scale", float)
@setting_option("--event-interval", "event_interval_min", float)
@setting_option("--budget", "budget_usd", float)
@setting_option("--budget-mode", "budget_mode", click.Choice(BUDGET_MODES))
@setting_option("--snapshot-interval", "snapshot_interval_min", float)
@setting_option("--metrics-interval", "metrics_interval_min", float)
@setting_option("--noise", "noise_events", int)
@setting_option("--seed", "scenario_seed", int)
@setting_option("--tag", "tag_repo", click.Path(path_type=Path))
@click.option("--resume", is_flag=True,
              help="Continue the latest run instead of starting a new one.")
@click.option("--detach", is_flag=True, help="Start under supervisord and return at once.")
@click.option("--restart-at", "restart_at_h", type=float,
              help="Foreground only: at this simulated hour kill -9 every process, wait 5 s, "
                   "resume and validate persistence (the plan's hour-12 check).")
@config_option
def run(duration_h: float | None, time_scale: float | None, event_interval_min: float | None,
        budget_usd: float | None, budget_mode: str | None, snapshot_interval_min: float | None,
        metrics_interval_min: float | None, noise_events: int | None, scenario_seed: int | None,
        tag_repo: Path | None, resume: bool, detach: bool, restart_at_h: float | None,
        config: Path) -> None:
    """Start a run under supervisord; in the foreground, wait for it and stop cleanly.

    Once the run has ended, a run that passed tags HEAD of the --tag repository; one that
    failed leaves a bug-report draft in the log folder."""
    from trinity.controller.ops import run as runner

    settings = load_settings(duration_h=duration_h, time_scale=time_scale,
                             event_interval_min=event_interval_min, budget_usd=budget_usd,
                             budget_mode=budget_mode, snapshot_interval_min=snapshot_interval_min,
                             metrics_interval_min=metrics_interval_min, noise_events=noise_events,
                             scenario_seed=scenario_seed, tag_repo=tag_repo)
    if restart_at_h is not None and (detach or not 0 < restart_at_h < settings.duration_h):
        raise click.UsageError("--restart-at needs a foreground run and an hour inside "
                               f"the run's duration (0 < hour < {settings.duration_h:g})")
    if tag_repo is not None and detach:
        raise click.UsageError("--tag needs a foreground run: a detached run ends after "
                               "trinity run has returned")
    with reported():
        code = runner.start(settings, config, resume=resume, detach=detach,
                            restart_at_h=restart_at_h)
    sys.exit(code)


@click.command()
@config_option
def stop(config: Path) -> None:
    """Stop the programs and supervisord, and clean up orphans of a killed supervisord."""
    from trinity.controller.supervision.supervisord import Supervisor

    with reported():
        sup = Supervisor(config)
        was_running = sup.is_running()
        sup.stop()
    click.echo("stopped" if was_running else "supervisord was not running (orphans cleaned up)")


@click.command("kill-and-resume")
@click.option("--wait", "wait_s", type=float, default=5.0, show_default=True,
              help="Seconds between the kill and the restart.")
@config_option
def kill_and_resume(wait_s: float, config: Path) -> None:
    """kill -9 supervisord and every program, wait, resume the run, validate persistence.

    Exits 1 if anything was not restored. The kill is recorded as deliberate, so it
    does not count as a crash.
    """
    from trinity.controller.ops import run as runner
    from trinity.controller.supervision.supervisord import Supervisor

    settings = load_settings()
    with reported():
        sup = Supervisor(config)
        if not sup.is_running():
            raise click.ClickException("supervisord is not running: start a run first "
                                       "('make start-24h')")
        problems = runner.kill_and_resume(settings, sup, wait_s=wait_s, echo=click.echo)
    sys.exit(1 if problems else 0)


@click.command("validate-persistence")
@click.option("--json", "as_json", is_flag=True, help="Print the state and problems as JSON.")
def validate_persistence(as_json: bool) -> None:
    """Check patterns, costs, cycle position and queues are restored; exit 1 if not.

    Compares with the state captured by the last kill-and-resume of the same run, when
    there is one; otherwise checks the stores are present, readable and consistent.
    With TRINITY_PATTERN_BACKEND=firestore it also queries Firestore for every detection
    of the run (GOOGLE_CLOUD_PROJECT, FIRESTORE_EMULATOR_HOST for an emulator).
    """
    from trinity.controller.ops import run as runner
    from trinity.controller.reports import persistence

    settings = load_settings()
    before = persistence.last_capture(settings)
    state, problems = persistence.validate(settings, before)
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, "state": state,
                               "compared_with_capture": before is not None}, indent=2))
    else:
        if before is not None:
            click.echo(f"compared with the state captured before the restart of run "
                       f"{before['run_id']}")
        for line in runner.format_validation(problems):
            click.echo(line)
    sys.exit(1 if problems else 0)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@config_option
def status(as_json: bool, config: Path) -> None:
    """Run progress, queue backlogs, agents and their last heartbeat age."""
    from trinity.controller.ops import run as runner

    report = runner.status(load_settings(), config)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(runner.format_status(report))
