"""Runs over time: ``trinity trends`` (the tracked metrics across runs) and ``trinity
schedule`` (the weekly smoke test and the monthly full run as systemd timers or cron)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trinity.cli.common import load_settings, reported


@click.command()
@click.option("--input", "input_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The logs folder holding the latest run's folder (24h_test) and archive/ "
                   "[the parent of TRINITY_LOG_DIR, logs].")
@click.option("--output", type=click.Path(path_type=Path),
              help="Folder for the charts and trends.html [reports/trends in "
                   "TRINITY_DATA_DIR].")
@click.option("--kind", type=click.Choice(("smoke", "full", "all")), default="all",
              show_default=True,
              help="Smoke tests (shorter than 24 simulated hours), full runs, or both.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the figures as JSON (the files are written all the same).")
def trends(input_dir: Path | None, output: Path | None, kind: str, as_json: bool) -> None:
    """The plan's metrics tracked over time, run after run, against their targets: cost
    per 24 h, detection accuracy, learning (confidence per week), peak memory, runs
    passed and failed. Each run's figures are those of its own report."""
    from trinity.controller.reports import trend_charts
    from trinity.controller.reports import trends as tracking

    settings = load_settings()
    chosen = None if kind == "all" else tracking.SMOKE if kind == "smoke" else tracking.FULL
    with reported():
        found = tracking.collect(settings, input_dir.resolve() if input_dir else None, chosen)
        written = trend_charts.write_trends(
            found, (output or settings.data_dir / "reports" / "trends").resolve())
    if as_json:
        click.echo(json.dumps({**found.as_json(), "files": [str(p) for p in written]},
                              indent=2))
        return
    click.echo(tracking.format_text(found), nl=False)
    for path in written:
        click.echo(f"wrote {path}")


@click.command()
@click.option("--project", "project", type=click.Path(path_type=Path), default=".",
              show_default=True, help="The Trinity project folder the runs run in.")
@click.option("--install", "do_install", is_flag=True,
              help="Write the systemd user units and enable their timers (or print the "
                   "command that does, where no systemd user manager answers).")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where --install writes the units [~/.config/systemd/user]; the timers "
                   "are then left for you to enable.")
def schedule(project: Path, do_install: bool, unit_dir: Path | None) -> None:
    """The plan's cadence: a 2-hour smoke test every week and the full 24-hour run every
    month, as systemd user timers and as crontab lines. Prints them; --install writes
    the units."""
    from trinity.controller.ops import schedule as cadence

    with reported():
        plan = cadence.make_schedule(project)
    if not do_install:
        for name, text in plan.units.items():
            click.echo(f"# {name}\n{text}")
        click.echo("# crontab lines (crontab -e)")
        for line in plan.cron_lines:
            click.echo(line)
        return
    target = unit_dir or cadence.default_unit_dir()
    with reported():
        written = cadence.install(plan, target)
    for path in written:
        click.echo(f"wrote {path}")
    problem = "the units are not in the user manager's folder" if unit_dir else (
        None if cadence.user_systemd_running() else "no systemd user manager answers here")
    if problem is None:
        problem = cadence.enable(plan)
        if problem is None:
            click.echo(f"enabled {', '.join(plan.timers)} (systemctl --user list-timers)")
            return
    click.echo(f"not enabled ({problem}); run:\n  {plan.enable_command()}")
    click.echo("or, without systemd, add these lines with crontab -e:")
    for line in plan.cron_lines:
        click.echo(f"  {line}")
