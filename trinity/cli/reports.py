"""What a run shows: ``trinity report``, ``export``, ``dashboard``, ``costs``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from trinity.cli.common import load_settings, reported


@click.command()
@click.option("--input", "input_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The run's log directory [TRINITY_LOG_DIR, logs/24h_test].")
@click.option("--run", "run_id",
              help="Run id (default: the run whose logs --input holds, else the latest).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Markdown report path [reports/24h_test_YYYYMMDD.md in TRINITY_DATA_DIR, "
                   "dated by the run's start]; the HTML version and the charts go beside it.")
def report(input_dir: Path | None, run_id: str | None, output: Path | None) -> None:
    """Write the 24-hour test report of a run: Markdown, HTML and four PNG charts."""
    from trinity.controller.ops.after_run import bug_report_path
    from trinity.controller.reports import report as reporting

    settings = load_settings()
    with reported():
        data = reporting.build_report_data(settings, input_dir.resolve() if input_dir else None,
                                           run_id)
        written = reporting.write_report(data, output or reporting.default_output(settings, data))
    failed = f" (failed: {', '.join(data.failed_mandatory)})" if data.failed_mandatory else ""
    click.echo(f"run {data.run.run_id}: {data.status}{failed}")
    # the draft stays in the run's log folder when a later run archives the rest
    drafts = [bug_report_path(d, data.run.run_id) for d in (data.log_dir, settings.log_dir)]
    for draft in [d for d in drafts if d.exists()][:1]:
        click.echo(f"bug report draft: {draft}")
    for path in written:
        click.echo(f"wrote {path}")


@click.command()
@click.option("--format", "fmt", type=click.Choice(("csv",)), required=True,
              help="Output format (one file per table).")
@click.option("--input", "log_dir", type=click.Path(path_type=Path),
              help="The run's log folder [TRINITY_LOG_DIR, logs/24h_test].")
@click.option("--run", "run_id", help="A run id (default: the latest run).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write events.csv, outcomes.csv, llm_calls.csv, alerts.csv and "
                   "metrics.csv into (created if missing).")
def export(fmt: str, log_dir: Path | None, run_id: str | None, output: Path) -> None:
    """Export one run's events, outcomes, model calls, alerts and metrics as CSV files.

    Stores are found through TRINITY_DATA_DIR as for the run. Prints one line per file
    written with its row count.
    """
    from trinity.controller.reports.export import export_run

    settings = load_settings()
    with reported():
        written = export_run(settings, log_dir or settings.log_dir, run_id, output)
    for name, rows in written.items():
        click.echo(f"{output / name}: {rows} rows")


@click.group()
def dashboard() -> None:
    """The plan's terminal dashboards: cost, patterns, system (--live to keep refreshing)."""


def _show(kind: str, live: bool, run_id: str | None, supervisor_config: Path | None) -> None:
    from rich.console import Console

    from trinity.controller.reports import dashboards
    from trinity.controller.supervision.supervisord import supervisord_state

    settings = load_settings()
    config = supervisor_config or settings.data_dir / "supervisor.conf"

    def supervisord() -> tuple[str, dict[str, str]]:
        return supervisord_state(config)

    console = Console()
    if live:
        dashboards.show_live(
            lambda: dashboards.live_frame(kind, settings, run_id, supervisord), console)
        return
    with reported():
        dashboards.show_once(kind, settings, run_id, supervisord, console)


def _dashboard_command(kind: str) -> Callable[[Callable[..., None]], click.Command]:
    """The options every dashboard takes, and the command named ``kind``."""
    from trinity.controller.reports.dashboards import MIN_REFRESH_S, SIM_REFRESH_S

    def decorate(func: Callable[..., None]) -> click.Command:
        func = click.option("--run", "run_id", help="A run id (default: the latest run).")(func)
        func = click.option(
            "--live", is_flag=True,
            help=f"Refresh every {SIM_REFRESH_S[kind]:g} simulated seconds (divided by the "
                 f"run's time scale, at least {MIN_REFRESH_S:g} s real) until Ctrl-C.")(func)
        return dashboard.command(kind)(func)
    return decorate


@_dashboard_command("cost")
def cost(live: bool, run_id: str | None) -> None:
    """Total cost vs budget, time, cost by agent and by model, calls, success rate."""
    _show("cost", live, run_id, None)


@_dashboard_command("patterns")
def patterns(live: bool, run_id: str | None) -> None:
    """Events processed, detections, signals, tasks, confidence by pattern, learning."""
    _show("patterns", live, run_id, None)


@_dashboard_command("system")
@click.option("--config", "supervisor_config", type=click.Path(dir_okay=False, path_type=Path),
              help="supervisord config asked for the programs' states "
                   "[default: supervisor.conf in TRINITY_DATA_DIR].")
def system(live: bool, run_id: str | None, supervisor_config: Path | None) -> None:
    """Uptime, memory, CPU, disk I/O, queue backlogs, database sizes, agents alive."""
    _show("system", live, run_id, supervisor_config)


@click.command()
@click.option("--run", "run_id", help="One run's calls (default: the latest run; 'all' for all).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def costs(run_id: str | None, as_json: bool) -> None:
    """Model-call totals from the cost ledger: by agent, model and provider."""
    from trinity.controller.ops import run as runner

    settings = load_settings()
    with reported():
        totals = runner.costs(settings, run_id)
    click.echo(json.dumps(totals, indent=2) if as_json else runner.format_costs(totals))
