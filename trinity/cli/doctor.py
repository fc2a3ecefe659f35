"""``trinity doctor``: the 24-hour plan's pre-test checklist as one command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from trinity.cli.common import config_option, reported
from trinity.contract.finding import Finding

# The checklist's order: the install, the settings, the model calls, then the run's
# folders, ports and processes. "settings" always runs (the others need it).
ORDER = ("python", "packages", "variables", "settings", "routing", "model-file", "completion",
         "provider", "keys", "supervisord", "dirs", "disk", "ports", "bus", "firestore",
         "processes", "stores")
_COLORS = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print the checks as a JSON list of {name, status, detail, fix}.")
@click.option("--skip", multiple=True, type=click.Choice([c for c in ORDER if c != "settings"]),
              help="A check not to run (repeatable), e.g. --skip completion.")
@click.option("--min-free", "min_free_mb", type=click.IntRange(min=0),
              help="MB that must be free on each filesystem the run writes to "
                   "[default: the run's estimated need].")
@config_option
def doctor(as_json: bool, skip: tuple[str, ...], min_free_mb: int | None, config: Path) -> None:
    """Check everything a 24-hour run needs, one line per check: PASS, WARN or FAIL and
    what to do. Exits 1 if any check FAILs (`make start-24h` stops then)."""
    from trinity.agents.models import doctor as models
    from trinity.controller.ops import doctor as system

    env = dict(os.environ)
    skipped = frozenset(skip)
    with reported():
        settings, findings = system.examine(
            env, config, skip=skipped,
            min_free_bytes=None if min_free_mb is None else min_free_mb * system.MB)
        routing = settings.routing_path if settings else system.routing_path(env)
        findings += models.examine(routing, env, skip=skipped)
    findings.sort(key=lambda f: ORDER.index(f.name.split(":")[0]))
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        _print(findings)
    sys.exit(system.exit_code(findings))


def _print(findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(soft_wrap=True, highlight=False)
    width = max(len(f.name) for f in findings)
    counts = {status: 0 for status in _COLORS}
    for f in findings:
        counts[f.status] += 1
        fix = f"  [bold]->[/] {escape(f.fix)}" if f.fix else ""
        console.print(f"[{_COLORS[f.status]}]{f.status}[/] {escape(f.name):<{width}}  "
                      f"{escape(f.detail)}{fix}")
    console.print(", ".join(f"{n} {status}" for status, n in counts.items()))
