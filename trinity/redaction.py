"""Secrets are never written: which values are secret, and masking them in text.

A variable of the environment is secret when its name looks like a key, token,
password, secret or credential (:data:`SECRET_NAME`: ``OPENAI_API_KEY``,
``GITHUB_TOKEN``, ``MY_DB_PASSWORD``), or it is ``TRINITY_ALERT_WEBHOOK`` (a webhook
URL carries its token in the path). An OpenAI-style key (``sk-...``) is masked
wherever it appears, from the environment or not.

Values shorter than :data:`MIN_SECRET_LEN` are not masked inside text: ``1`` or
``true`` would mask half a log line. Where variables are written by name
(``test_config.json``) every secret one is withheld, whatever its length.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw|credential)")
SECRET_VARIABLES = frozenset({"TRINITY_ALERT_WEBHOOK"})
KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*]{8,}")
MASK = "[redacted]"
MIN_SECRET_LEN = 6


def is_secret_name(name: str) -> bool:
    return name in SECRET_VARIABLES or SECRET_NAME.search(name) is not None


def secret_values(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secret values of ``env`` (default: this process's) long enough to mask in text,
    longest first, so a secret that contains another is masked whole."""
    env = os.environ if env is None else env
    values = {value for name, value in env.items()
              if is_secret_name(name) and len(value) >= MIN_SECRET_LEN}
    return tuple(sorted(values, key=len, reverse=True))


def withhold_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with every secret variable's value replaced by the mask (empty ones kept)."""
    return {name: MASK if value and is_secret_name(name) else value
            for name, value in env.items()}


class Redactor:
    """Masks given secret values (also in their JSON-escaped form) and ``sk-`` keys."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = set()
        for secret in secrets:
            if len(secret) >= MIN_SECRET_LEN:
                forms.add(secret)
                forms.add(json.dumps(secret)[1:-1])  # as it stands inside a JSON string
        self.forms = tuple(sorted(forms, key=len, reverse=True))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Redactor:
        return cls(secret_values(env))

    def __call__(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, MASK)
        return KEY_PATTERN.sub(f"sk-{MASK}", text)
