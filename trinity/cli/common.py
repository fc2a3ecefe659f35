"""What every command module shares: settings as a usage error, the supervisord config
option, and Trinity's errors turned into one-line click errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from trinity.errors import ConfigError, TrinityError
from trinity.settings import Settings

DEFAULT_CONFIG = "supervisor.conf"
F = TypeVar("F", bound=Callable[..., Any])


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment and the flags; a bad value is a usage error."""
    try:
        return Settings.from_env(**overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def config_option(func: F) -> F:
    """``--config``: the supervisord config file."""
    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
                        default=DEFAULT_CONFIG, show_default=True,
                        help="supervisord config file.")(func)


def setting_option(flag: str, name: str,
                   kind: type | click.ParamType[Any]) -> Callable[[F], F]:
    """A flag that overrides the setting ``name``; its help (text, variable, default) is
    the setting's own."""
    return click.option(flag, name, type=kind, help=Settings.option_help(name))


@contextmanager
def reported(prefix: str = "") -> Iterator[None]:
    """Trinity's own errors end the command with their one-line message (exit 1)."""
    try:
        yield
    except TrinityError as exc:
        raise click.ClickException(f"{prefix}{exc}") from None
