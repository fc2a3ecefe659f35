"""The ``trinity`` command: a thin click layer that parses and delegates."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from trinity.errors import ConfigError, TrinityError
from trinity.settings import Settings

DEFAULT_CONFIG = "supervisor.conf"


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


class LazyGroup(click.Group):
    """A group whose heavier commands (the report imports matplotlib) are imported only
    when they are run or listed, so ``trinity status`` stays quick."""

    lazy: dict[str, str] = {
        "chaos": "trinity.controller.chaos:chaos_command",
        "dashboard": "trinity.controller.dashboards:dashboard_command",
        "export": "trinity.controller.export:export_command",
        "keys": "trinity.bus.curve:keys_command",
        "report": "trinity.controller.report:report_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            module, attr = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="trinity")
def main() -> None:
    """Trinity: supervised WITNESS / ARCHITECT / EXECUTOR agents on a durable bus."""


@main.command()
@click.argument("name", type=click.Choice(["witness", "architect", "executor"]))
def agent(name: str) -> None:
    """Run one agent process (supervisord starts these)."""
    import importlib

    from trinity import logs

    settings = _settings()
    logs.configure(name, settings.log_dir / "trinity.log")
    # Only this agent's module: WITNESS has no use for the model agents' router and
    # pydantic models, nor they for the detector.
    cls = getattr(importlib.import_module(f"trinity.agents.{name}"), name.capitalize())
    sys.exit(cls(settings).run())


@main.command()
def controller() -> None:
    """Run the controller process (supervisord starts it)."""
    from trinity import logs
    from trinity.controller.controller import Controller

    settings = _settings()
    logs.configure("controller", settings.log_dir / "trinity.log")
    sys.exit(Controller(settings).run())


@main.command()
def crashwatch() -> None:
    """supervisord event listener that records unexpected exits (not for interactive use)."""
    from trinity import logs
    from trinity.controller import crashwatch as watch

    settings = _settings()
    logs.configure("crashwatch", settings.log_dir / "trinity.log")
    sys.exit(watch.main(settings))


@main.command()
@click.option("--duration", "duration_h", type=float,
              help="Simulated hours [TRINITY_TEST_DURATION, 24].")
@click.option("--time-scale", type=float,
              help="Simulated seconds per real second [TRINITY_TIME_SCALE, 1].")
@click.option("--event-interval", "event_interval_min", type=float,
              help="Simulated minutes between events [TRINITY_EVENT_INTERVAL, 30].")
@click.option("--budget", "budget_usd", type=float,
              help="Total model budget in USD [TRINITY_TEST_BUDGET, 10].")
@click.option("--budget-mode", type=click.Choice(["warn", "enforce"]),
              help="warn: alerts only; enforce: route every call local once the budget is "
                   "spent [TRINITY_BUDGET_MODE, warn].")
@click.option("--snapshot-interval", "snapshot_interval_min", type=float,
              help="Simulated minutes between cost and pattern snapshots "
                   "[TRINITY_SNAPSHOT_INTERVAL, 60].")
@click.option("--metrics-interval", "metrics_interval_min", type=float,
              help="Simulated minutes between system metrics samples "
                   "[TRINITY_METRICS_INTERVAL, 5].")
@click.option("--noise", "noise_events", type=int,
              help="Noise events (none of the five patterns) per event interval "
                   "[TRINITY_NOISE_EVENTS, 0].")
@click.option("--seed", "scenario_seed", type=int,
              help="Scenario seed: which event variants are drawn [TRINITY_SCENARIO_SEED, 0].")
@click.option("--resume", is_flag=True,
              help="Continue the latest run instead of starting a new one.")
@click.option("--detach", is_flag=True, help="Start under supervisord and return at once.")
@click.option("--restart-at", "restart_at_h", type=float,
              help="Foreground only: at this simulated hour kill -9 every process, wait 5 s, "
                   "resume and validate persistence (the plan's hour-12 check).")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="supervisord config file.")
def run(duration_h: float | None, time_scale: float | None, event_interval_min: float | None,
        budget_usd: float | None, budget_mode: str | None, snapshot_interval_min: float | None,
        metrics_interval_min: float | None, noise_events: int | None, scenario_seed: int | None,
        resume: bool, detach: bool, restart_at_h: float | None, config: Path) -> None:
    """Start a run under supervisord; in the foreground, wait for it and stop cleanly."""
    from trinity.controller import runner

    settings = _settings(duration_h=duration_h, time_scale=time_scale,
                         event_interval_min=event_interval_min, budget_usd=budget_usd,
                         budget_mode=budget_mode, snapshot_interval_min=snapshot_interval_min,
                         metrics_interval_min=metrics_interval_min, noise_events=noise_events,
                         scenario_seed=scenario_seed)
    if restart_at_h is not None and (detach or not 0 < restart_at_h < settings.duration_h):
        raise click.UsageError("--restart-at needs a foreground run and an hour inside "
                               f"the run's duration (0 < hour < {settings.duration_h:g})")
    try:
        code = runner.start(settings, config, resume=resume, detach=detach,
                            restart_at_h=restart_at_h)
    except TrinityError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="supervisord config file.")
def stop(config: Path) -> None:
    """Stop the programs and supervisord, and clean up orphans of a killed supervisord."""
    from trinity.controller.supervision import Supervisor

    try:
        sup = Supervisor(config)
        was_running = sup.is_running()
        sup.stop()
    except TrinityError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("stopped" if was_running else "supervisord was not running (orphans cleaned up)")


@main.command()
@click.argument("source", type=click.File("rb"), default="-")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Lines per journal transaction (1: publish each line as it arrives).")
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
def emit(source: Any, batch_size: int, quiet: bool) -> None:
    """Journal JSON Lines events from SOURCE (a file, or - for stdin) onto telemetry_stream.

    One JSON object per line with a non-empty "message"; an "event_id" makes re-emitting
    the line a no-op. Writes one JSON result per non-blank line; rejected lines are
    dead-lettered (trinity dead-letters). Exit status 1 if any line was rejected.
    """
    from trinity.controller import emit as emitter

    settings = _settings()
    summary = emitter.EmitSummary()
    try:
        for result in emitter.emit_lines(settings, source, batch_size=batch_size):
            summary.add(result)
            if not quiet:
                click.echo(json.dumps(result.as_dict()))
    except TrinityError as exc:
        raise click.ClickException(f"{exc}; committed before it: {summary.describe()}") from None
    click.echo(summary.describe(), err=True)
    sys.exit(summary.exit_code)


@main.command("kill-and-resume")
@click.option("--wait", "wait_s", type=float, default=5.0, show_default=True,
              help="Seconds between the kill and the restart.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="supervisord config file.")
def kill_and_resume(wait_s: float, config: Path) -> None:
    """kill -9 supervisord and every program, wait, resume the run, validate persistence.

    Exits 1 if anything was not restored. The kill is recorded as deliberate, so it
    does not count as a crash.
    """
    from trinity.controller import runner
    from trinity.controller.supervision import Supervisor

    settings = _settings()
    try:
        sup = Supervisor(config)
        if not sup.is_running():
            raise click.ClickException("supervisord is not running: start a run first "
                                       "('make start-24h')")
        problems = runner.kill_and_resume(settings, sup, wait_s=wait_s, echo=click.echo)
    except TrinityError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(1 if problems else 0)


@main.command("validate-persistence")
@click.option("--json", "as_json", is_flag=True, help="Print the state and problems as JSON.")
def validate_persistence(as_json: bool) -> None:
    """Check patterns, costs, cycle position and queues are restored; exit 1 if not.

    Compares with the state captured by the last kill-and-resume of the same run, when
    there is one; otherwise checks the stores are present, readable and consistent.
    With TRINITY_PATTERN_BACKEND=firestore it also queries Firestore for every detection
    of the run (GOOGLE_CLOUD_PROJECT, FIRESTORE_EMULATOR_HOST for an emulator).
    """
    from trinity.controller import persistence, runner

    settings = _settings()
    before = None
    if settings.messages_db.exists():
        try:
            run_id = persistence.capture(settings)["run_id"]
            before = persistence.load_before(settings, run_id)
        except Exception:  # validate() below reports what cannot be read
            before = None
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="supervisord config file.")
def status(as_json: bool, config: Path) -> None:
    """Run progress, queue backlogs, agents and their last heartbeat age."""
    from trinity.controller import runner

    report = runner.status(_settings(), config)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(runner.format_status(report))


@main.command()
@click.argument("source", type=click.File("r", encoding="utf-8", errors="surrogateescape"),
                default="-")
@click.option("--no-learn", is_flag=True, help="Classify without adding exemplars.")
def classify(source: Any, no_learn: bool) -> None:
    """Classify JSON Lines events from SOURCE (a file, or - for stdin).

    Writes one JSON line per input line, in order: {"id", "pattern", "confidence"},
    or {"error": reason} for a line that cannot be classified. Uses the same
    detector and pattern store as the WITNESS process (TRINITY_DATA_DIR).
    """
    from trinity.agents import classify as classify_lines

    settings = _settings()
    for result in classify_lines.run(settings, source, learn=not no_learn):
        click.echo(json.dumps(result))  # ASCII-escaped: lone surrogates stay printable


@main.group()
def witness() -> None:
    """WITNESS tools: evaluation on the labelled dev set."""


@witness.command("eval")
@click.option("--folds", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Grouped CV repeated with this many seeds; the figures are the means.")
@click.option("--errors", is_flag=True, help="List the cross-validation errors.")
@click.option("--no-holdout", is_flag=True, help="Skip scoring the holdout.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def witness_eval(folds: int, seed: int, repeats: int, errors: bool, no_holdout: bool,
                 as_json: bool) -> None:
    """Cross-validate the detector on the dev set; exit 1 if a target is missed."""
    from trinity.agents import evaluate

    argv = ["--folds", str(folds), "--seed", str(seed), "--repeats", str(repeats)]
    argv += [flag for flag, on in (("--errors", errors), ("--no-holdout", no_holdout),
                                   ("--json", as_json)) if on]
    sys.exit(evaluate.main(argv))


@main.command()
@click.option("--run", "run_id", help="One run's calls (default: the latest run; 'all' for all).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def costs(run_id: str | None, as_json: bool) -> None:
    """Model-call totals from the cost ledger: by agent, model and provider."""
    from trinity.controller import runner

    settings = _settings()
    try:
        report = runner.costs(settings, run_id)
    except TrinityError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report, indent=2) if as_json else runner.format_costs(report))


@main.command("dead-letters")
@click.option("--limit", type=int, default=20, show_default=True, help="How many, newest first.")
def dead_letters(limit: int) -> None:
    """List dead-lettered messages with their reasons."""
    from trinity.bus.journal import Journal

    settings = _settings()
    if not settings.messages_db.exists():
        click.echo(f"no journal at {settings.messages_db}")
        return
    journal = Journal(settings.messages_db, source="cli")
    try:
        letters = journal.dead_letters()[-limit:]
    finally:
        journal.close()
    if not letters:
        click.echo("no dead letters")
    for letter in reversed(letters):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.created_ms / 1000))
        click.echo(f"{stamp}  {letter.consumer:<10} {letter.stream or '-':<18} "
                   f"{letter.size:>8} B  {letter.reason}")


if __name__ == "__main__":
    main()
