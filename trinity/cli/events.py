"""Events in: ``trinity emit`` (onto telemetry_stream), ``trinity classify`` (WITNESS's
decision, off the bus), ``trinity dead-letters`` (what was refused, and why)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from trinity.cli.common import load_settings
from trinity.errors import TrinityError


@click.command()
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
    from trinity.controller.ops import emit as emitter

    settings = load_settings()
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


@click.command()
@click.argument("source", type=click.File("r", encoding="utf-8", errors="surrogateescape"),
                default="-")
@click.option("--no-learn", is_flag=True, help="Classify without adding exemplars.")
def classify(source: Any, no_learn: bool) -> None:
    """Classify JSON Lines events from SOURCE (a file, or - for stdin).

    Writes one JSON line per input line, in order: {"id", "pattern", "confidence"},
    or {"error": reason} for a line that cannot be classified. Uses the same
    detector and pattern store as the WITNESS process (TRINITY_DATA_DIR).
    """
    from trinity.agents.witness import classify as classify_lines

    settings = load_settings()
    for result in classify_lines.run(settings, source, learn=not no_learn):
        click.echo(json.dumps(result))  # ASCII-escaped: lone surrogates stay printable


@click.command("dead-letters")
@click.option("--limit", type=int, default=20, show_default=True, help="How many, newest first.")
def dead_letters(limit: int) -> None:
    """List dead-lettered messages with their reasons."""
    import sqlite3

    from trinity.db import reading
    from trinity.stores import journal

    settings = load_settings()
    if not settings.messages_db.exists():
        click.echo(f"no journal at {settings.messages_db}")
        return
    try:
        with reading(settings.messages_db) as conn:
            letters = journal.dead_letters(conn, newest=limit)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot read {settings.messages_db}: {exc}") from None
    if not letters:
        click.echo("no dead letters")
    for letter in letters:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.created_ms / 1000))
        click.echo(f"{stamp}  {letter.consumer:<10} {letter.stream or '-':<18} "
                   f"{letter.size:>8} B  {letter.reason}")
