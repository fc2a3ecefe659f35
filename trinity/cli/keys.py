"""``trinity keys``: ZeroMQ CURVE keys for the bus."""

from __future__ import annotations

import os
from pathlib import Path

import click

from trinity.contract import PROCESSES
from trinity.errors import ConfigError
from trinity.settings import curve_keys_dir


@click.group()
def keys() -> None:
    """ZeroMQ CURVE keys for the bus (needed for any endpoint off loopback)."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Key folder [TRINITY_CURVE_DIR, or <data dir>/curve_keys].")
@click.option("--force", is_flag=True, help="Replace existing keys (old ones stop working).")
def generate(directory: Path | None, force: bool) -> None:
    """One key pair per process; every bus socket uses them once the folder exists."""
    from trinity.bus import curve

    default, _ = curve_keys_dir(os.environ)
    target = (directory or default).resolve()
    try:
        secrets = curve.generate(target, PROCESSES, force=force)
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(secrets)} key pairs to {target} "
               f"({', '.join(p.name for p in secrets)})")
    if directory is not None and directory.resolve() != default:
        click.echo(f"set TRINITY_CURVE_DIR={target} for every process to use them")
    click.echo(f"another host needs {target / curve.PUBLIC_DIR}/ and only its own process's "
               f"{curve.PRIVATE_DIR}/<name>{curve.SECRET_SUFFIX}")
