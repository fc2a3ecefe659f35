"""``trinity chaos``: a compressed run under a seeded chaos monkey, then an audit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trinity.cli.common import reported


@click.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              default=Path("chaos"), show_default=True,
              help="Project folder of the run (emptied first if an earlier chaos run left it).")
@click.option("--duration", "duration_h", type=float, default=24.0, show_default=True,
              help="Simulated hours.")
@click.option("--time-scale", type=float, default=288.0, show_default=True,
              help="Simulated seconds per real second.")
@click.option("--kills", type=click.IntRange(min=0), default=50, show_default=True,
              help="kill -9 faults.")
@click.option("--stops", type=click.IntRange(min=0), default=4, show_default=True,
              help="SIGSTOP/SIGCONT faults.")
@click.option("--seed", type=int, default=0, show_default=True, help="The monkey's seed.")
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True,
              help="Give up (and fail) after this many real seconds.")
@click.option("--config", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("supervisor.conf"), show_default=True,
              help="supervisord config copied into the folder.")
def chaos(folder: Path, duration_h: float, time_scale: float, kills: int, stops: int,
          seed: int, timeout_s: float, config: Path) -> None:
    """A compressed run under a seeded chaos monkey (kill -9 and SIGSTOP of random
    processes), then an audit of the stores: exit 0 only if nothing was lost or
    duplicated and every mandatory criterion passed."""
    from trinity.controller.ops.chaos import chaos as run_chaos

    with reported():
        code = run_chaos(folder.resolve(), config.resolve(), duration_h=duration_h,
                         time_scale=time_scale, kills=kills, stops=stops, seed=seed,
                         timeout_s=timeout_s)
    sys.exit(code)
