"""The processes supervisord starts: ``trinity agent NAME``, ``trinity controller``,
``trinity model-server``, ``trinity crashwatch`` (not for interactive use)."""

from __future__ import annotations

import importlib
import sys

import click

from trinity import logs
from trinity.cli.common import load_settings
from trinity.contract import (
    AGENTS,
    ARCHITECT,
    CONTROLLER,
    CRASHWATCH,
    EXECUTOR,
    MODEL_SERVER_COMMAND,
    MODELS,
    WITNESS,
)

# Each agent's process class; only the named agent's module is imported: WITNESS has no
# use for the model agents' router and pydantic models, nor they for the detector.
AGENT_CLASSES = {
    WITNESS: "trinity.agents.witness.process:Witness",
    ARCHITECT: "trinity.agents.architect:Architect",
    EXECUTOR: "trinity.agents.executor:Executor",
}


@click.command()
@click.argument("name", type=click.Choice(AGENTS))
def agent(name: str) -> None:
    """Run one agent process (supervisord starts these)."""
    settings = load_settings()
    logs.configure(name, settings.log_dir / "trinity.log")
    module, attr = AGENT_CLASSES[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    sys.exit(cls(settings).run())


@click.command()
def controller() -> None:
    """Run the controller process (supervisord starts it)."""
    from trinity.controller.process.controller import Controller

    settings = load_settings()
    logs.configure(CONTROLLER, settings.log_dir / "trinity.log")
    sys.exit(Controller(settings).run())


@click.command(MODEL_SERVER_COMMAND)
def model_server() -> None:
    """Run the shared model server: the embedded model for the model agents
    (supervisord starts it as the `models` program)."""
    from trinity.agents.models.serve import ModelServer

    settings = load_settings()
    logs.configure(MODELS, settings.log_dir / "trinity.log")
    sys.exit(ModelServer(settings).run())


@click.command()
def crashwatch() -> None:
    """supervisord event listener that records unexpected exits (not for interactive use)."""
    from trinity.controller.supervision import crashwatch as watch

    settings = load_settings()
    logs.configure(CRASHWATCH, settings.log_dir / "trinity.log")
    sys.exit(watch.main(settings))
