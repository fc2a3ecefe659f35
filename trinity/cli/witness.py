"""WITNESS's tools: ``trinity witness eval``."""

from __future__ import annotations

import json
import sys

import click


@click.group()
def witness() -> None:
    """WITNESS tools: evaluation on the labelled dev set."""


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
