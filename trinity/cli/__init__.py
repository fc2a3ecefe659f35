"""The ``trinity`` command: a thin click layer that parses and delegates.

One module per command group; a command's module is imported only when it is run or
listed, so ``trinity status`` does not load the report's matplotlib or the detector.

- ``processes``  agent, controller, model-server, crashwatch: what supervisord starts
- ``run``        run, stop, status, kill-and-resume, validate-persistence
- ``events``     emit, classify, dead-letters
- ``witness``    witness eval
- ``reports``    report, export, dashboard, costs
- ``chaos``      chaos
- ``keys``       keys generate
- ``doctor``     doctor: the pre-test checklist
- ``trends``     trends, schedule: runs over time and the plan's cadence
"""

from __future__ import annotations

import importlib

import click

from trinity.contract import CONTROLLER, CRASHWATCH, MODEL_SERVER_COMMAND, WITNESS

COMMANDS: dict[str, str] = {
    "agent": "processes:agent",
    CONTROLLER: "processes:controller",
    CRASHWATCH: "processes:crashwatch",
    MODEL_SERVER_COMMAND: "processes:model_server",
    "run": "run:run",
    "stop": "run:stop",
    "status": "run:status",
    "kill-and-resume": "run:kill_and_resume",
    "validate-persistence": "run:validate_persistence",
    "emit": "events:emit",
    "classify": "events:classify",
    "dead-letters": "events:dead_letters",
    WITNESS: "witness:witness",
    "report": "reports:report",
    "export": "reports:export",
    "dashboard": "reports:dashboard",
    "costs": "reports:costs",
    "chaos": "chaos:chaos",
    "keys": "keys:keys",
    "doctor": "doctor:doctor",
    "trends": "trends:trends", "schedule": "trends:schedule",
}


class LazyGroup(click.Group):
    """A group whose commands are imported from their module only when run or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(f"trinity.cli.{module}"), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@click.version_option(package_name="trinity")
def main() -> None:
    """Trinity: supervised WITNESS / ARCHITECT / EXECUTOR agents on a durable bus."""


if __name__ == "__main__":
    main()
