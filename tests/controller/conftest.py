"""Fixtures shared by the controller tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.controller.test_webhook import Hook


@pytest.fixture
def serve() -> Iterator[Callable[..., Hook]]:
    """Start local webhook receivers (``Hook``); every one is stopped after the test."""
    hooks: list[Hook] = []

    def start(*script: int | str, **kwargs: Any) -> Hook:
        hook = Hook(*script, **kwargs)
        hooks.append(hook)
        return hook

    yield start
    for hook in hooks:
        hook.stop()
