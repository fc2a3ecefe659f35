"""WITNESS's tools: ``trinity witness eval`` and ``trinity witness correct``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from trinity.cli.common import load_settings


@click.group()
def witness() -> None:
    """WITNESS tools: evaluation on the labelled dev set, corrections."""


@witness.command("eval")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Grouped CV repeated with this many seeds; the figures are the means.")
@click.option("--errors", is_flag=True, help="List the cross-validation errors.")
@click.option("--no-holdout", is_flag=True, help="Skip scoring the holdout.")
@click.option("--holdout-errors", is_flag=True,
              help="List the holdout's errors (for the final analysis only: never tune on them).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def witness_eval(folds: int, seed: int, repeats: int, errors: bool, no_holdout: bool,
                 holdout_errors: bool, as_json: bool) -> None:
    """Cross-validate the detector on the dev set; exit 1 if a target is missed."""
    from trinity.agents.witness import evaluate

    result = evaluate.evaluate(folds, seed, repeats, holdout=not no_holdout)
    if as_json:
        click.echo(json.dumps(result.as_json(errors=errors, holdout_errors=holdout_errors),
                              indent=2))
    else:
        evaluate.print_results(result, errors=errors, holdout_errors=holdout_errors)
    sys.exit(0 if result.passed else 1)


@witness.command("correct")
@click.argument("event_id", required=False)
@click.argument("label", required=False)
@click.option("--message", help="The event's text, when the store never classified EVENT_ID.")
@click.option("--file", "source", type=click.File("r", encoding="utf-8", errors="surrogateescape"),
              help='JSON Lines of {"event_id", "label"[, "message"]} (- for stdin).')
def witness_correct(event_id: str | None, label: str | None, message: str | None,
                    source: Any) -> None:
    """Record what EVENT_ID really was (LABEL: a pattern or none), or a file of such.

    The event's learned exemplar is relabelled, its text becomes an exemplar of LABEL,
    and from then on an event with the same or a nearly identical text is decided as
    LABEL, by a running WITNESS too (within a second), and after restarts. Exit 1 when
    any correction could not be applied (each is reported with its reason and
    dead-lettered: trinity dead-letters).
    """
    from trinity.agents.witness import corrections
    from trinity.agents.witness.knowledge import open_store

    if (source is None) == (label is None):
        raise click.UsageError("give EVENT_ID LABEL, or --file")
    if source is not None and (event_id or message):
        raise click.UsageError("--file takes no EVENT_ID, LABEL or --message")
    settings = load_settings()
    with open_store(settings) as store:
        if source is not None:
            outcomes = list(corrections.apply_file(store, source, source.name))
        else:
            outcomes = [corrections.apply(store, event_id, str(label), message,
                                          where=f"event {event_id}", source="cli")]
    for outcome in outcomes:
        click.echo(outcome.describe(), err=outcome.error is not None)
    rejected = corrections.dead_letter(settings.messages_db, outcomes)
    applied = len(outcomes) - rejected
    click.echo(f"{applied} of {len(outcomes)} corrections applied"
               + (" (reasons and raw lines: trinity dead-letters)" if rejected else ""), err=True)
    sys.exit(0 if applied == len(outcomes) else 1)
