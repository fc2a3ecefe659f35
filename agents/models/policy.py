"""The routing policy: a TOML file read once, checked, and turned into providers.

The shipped policy is ``trinity/routing.toml``; ``TRINITY_ROUTING`` points at another.
Every mistake in the file is a ConfigError naming the key, raised before any process
starts work.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity.agents.models.providers.base import Provider
from trinity.errors import ConfigError

PROVIDER_KINDS = ("embedded", "ollama", "openai", "instant")  # instant: benchmarks only
# Answer length limit (tokens) of an agent the policy gives none.
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class CallPolicy:
    timeout_s: float = 30.0
    max_attempts: int = 2
    backoff_s: tuple[float, ...] = (0.5, 2.0)
    cooldown_after: int = 3
    cooldown_s: float = 120.0

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based) on one provider."""
        if not self.backoff_s:
            return 0.0
        return self.backoff_s[min(retry, len(self.backoff_s)) - 1]


@dataclass(frozen=True)
class Route:
    chain: tuple[str, ...]
    agents: frozenset[str] | None = None
    patterns: frozenset[str] | None = None
    severities: frozenset[str] | None = None
    within_budget: bool = False

    def matches(self, agent: str, pattern: str | None, severity: str | None) -> bool:
        return ((self.agents is None or agent in self.agents)
                and (self.patterns is None or pattern in self.patterns)
                and (self.severities is None or (severity or "").lower() in self.severities))


@dataclass(frozen=True)
class RoutingPolicy:
    source: str
    call: CallPolicy
    providers: dict[str, dict[str, Any]]
    routes: tuple[Route, ...]
    max_tokens: dict[str, int] = field(default_factory=dict)

    def route_for(self, agent: str, pattern: str | None, severity: str | None) -> Route:
        for route in self.routes:
            if route.matches(agent, pattern, severity):
                return route
        raise ConfigError(f"{self.source}: no route matches agent={agent!r} "
                          f"pattern={pattern!r} severity={severity!r}; end with a catch-all")

    def max_tokens_for(self, agent: str) -> int:
        return self.max_tokens.get(agent, DEFAULT_MAX_TOKENS)


def _number(table: Mapping[str, Any], key: str, where: str, default: float, *,
            minimum: float = 0.0) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < minimum:
        raise ConfigError(f"{where}.{key} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _names(table: Mapping[str, Any], key: str, where: str) -> frozenset[str] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}.{key} must be a list of strings, got {value!r}")
    return frozenset(v.lower() if key == "severities" else v for v in value)


def _call_policy(table: Mapping[str, Any], source: str) -> CallPolicy:
    where = f"{source} [call]"
    backoff = table.get("backoff_s", [0.5, 2.0])
    if not isinstance(backoff, list) or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and b >= 0 for b in backoff):
        raise ConfigError(f"{where}.backoff_s must be a list of numbers >= 0, got {backoff!r}")
    return CallPolicy(
        timeout_s=_number(table, "timeout_s", where, 30.0, minimum=0.001),
        max_attempts=int(_number(table, "max_attempts", where, 2, minimum=1)),
        backoff_s=tuple(float(b) for b in backoff),
        cooldown_after=int(_number(table, "cooldown_after", where, 3, minimum=1)),
        cooldown_s=_number(table, "cooldown_s", where, 120.0),
    )


def _check_windows(providers: Mapping[str, Any], max_tokens: Mapping[str, int],
                   source: str) -> None:
    """An embedded model's context window must hold the longest answer and at least as
    many prompt tokens."""
    from trinity.agents.models.providers.model_file import DEFAULT_N_CTX

    longest = max([DEFAULT_MAX_TOKENS, *max_tokens.values()])
    for name, spec in providers.items():
        if spec["kind"] == "embedded":
            n_ctx = int(_number(spec, "n_ctx", f"{source} providers.{name}", DEFAULT_N_CTX,
                                minimum=64))
            if n_ctx < 2 * longest:
                raise ConfigError(f"{source}: providers.{name}.n_ctx = {n_ctx} leaves no room "
                                  f"for a prompt beside an answer of {longest} tokens "
                                  f"(agents.*.max_tokens); use at least {2 * longest}")


def parse_policy(data: Mapping[str, Any], source: str) -> RoutingPolicy:
    providers = data.get("providers")
    if not isinstance(providers, dict) or not providers:
        raise ConfigError(f"{source}: [providers] must define at least one provider")
    for name, spec in providers.items():
        if not isinstance(spec, dict) or spec.get("kind") not in PROVIDER_KINDS:
            raise ConfigError(f"{source}: providers.{name}.kind must be one of "
                              f"{', '.join(PROVIDER_KINDS)}")
    routes: list[Route] = []
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError(f"{source}: at least one [[routes]] entry is required")
    for i, raw in enumerate(raw_routes):
        where = f"{source} routes[{i}]"
        chain = raw.get("chain") if isinstance(raw, dict) else None
        if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
            raise ConfigError(f"{where}.chain must be a non-empty list of provider names")
        unknown = [c for c in chain if c not in providers]
        if unknown:
            raise ConfigError(f"{where}.chain names unknown providers: {', '.join(unknown)}")
        routes.append(Route(
            chain=tuple(chain),
            agents=_names(raw, "agents", where),
            patterns=_names(raw, "patterns", where),
            severities=_names(raw, "severities", where),
            within_budget=bool(raw.get("within_budget", False)),
        ))
    if routes[-1].agents or routes[-1].patterns or routes[-1].severities:
        raise ConfigError(f"{source}: the last route must be a catch-all (no agents/patterns/"
                          "severities), so every call has a route")
    max_tokens: dict[str, int] = {}
    for agent, table in (data.get("agents") or {}).items():
        max_tokens[agent] = int(_number(table, "max_tokens", f"{source} agents.{agent}",
                                        DEFAULT_MAX_TOKENS,
                                        minimum=16))
    _check_windows(providers, max_tokens, source)
    return RoutingPolicy(source, _call_policy(data.get("call") or {}, source), providers,
                         tuple(routes), max_tokens)


def load_policy(path: Path | None = None) -> RoutingPolicy:
    """The policy at ``path``, or the shipped one."""
    if path is None:
        text = importlib.resources.files("trinity").joinpath("routing.toml").read_text("utf-8")
        source = "routing.toml (shipped)"
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"routing policy {path}: {exc.strerror or exc}") from None
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"routing policy {source} is not valid TOML: {exc}") from None
    return parse_policy(data, source)


def _env(spec: Mapping[str, Any], key: str, env: Mapping[str, str]) -> str | None:
    """A value given directly (``key``) or through a variable (``key_env``)."""
    if spec.get(key):
        return str(spec[key])
    var = spec.get(f"{key}_env")
    return (env.get(str(var)) or None) if var else None


def embedded_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """An embedded provider's settings from its routing table: the same for llama.cpp in
    this process and for a call to the model server (which loads what it is asked for)."""
    from trinity.agents.models.providers.model_file import DEFAULT_MODEL, DEFAULT_N_CTX

    return {"model": str(spec.get("model", DEFAULT_MODEL)), "model_path": spec.get("model_path"),
            "n_ctx": int(spec.get("n_ctx", DEFAULT_N_CTX)),
            "n_threads": int(spec["n_threads"]) if spec.get("n_threads") else None}


def build_providers(
    policy: RoutingPolicy, env: Mapping[str, str] | None = None,
    model_server: str | None = None,
) -> dict[str, Provider]:
    """One provider object per configured name; nothing is loaded or contacted yet.

    With ``model_server`` (an endpoint) the embedded providers are calls to the shared
    model server (``trinity model-server``) instead of llama.cpp in this process."""
    from trinity.agents.models.providers.ollama_api import OllamaProvider
    from trinity.agents.models.providers.openai_api import (
        AUTO,
        SCHEMA_STYLES,
        OpenAIProvider,
    )

    env = os.environ if env is None else env
    built: dict[str, Provider] = {}
    for name, spec in policy.providers.items():
        kind = spec["kind"]
        if kind == "embedded":
            local = embedded_spec(spec)
            if model_server:
                from trinity.agents.models.providers.served import ServedProvider

                built[name] = ServedProvider(name, endpoint=model_server, **local)
            else:
                from trinity.agents.models.providers.embedded import EmbeddedProvider

                built[name] = EmbeddedProvider(name, **local)
        elif kind == "ollama":
            built[name] = OllamaProvider(name, model=str(spec.get("model", "")),
                                         host=_env(spec, "host", env))
        elif kind == "instant":
            from trinity.agents.models.providers.instant import InstantProvider

            built[name] = InstantProvider(name, env=env, source=policy.source)
        else:
            # auto: the structured-output form is negotiated with the server; a named
            # form is tried first (see openai_api).
            style = str(spec.get("schema_style", AUTO))
            if style not in SCHEMA_STYLES:
                raise ConfigError(f"{policy.source}: providers.{name}.schema_style must be one "
                                  f"of {', '.join(SCHEMA_STYLES)}, got {style!r}")
            price_model = spec.get("price_model")
            built[name] = OpenAIProvider(
                name, model=str(spec.get("model", "")), api_key=_env(spec, "api_key", env),
                base_url=_env(spec, "base_url", env),
                price_model=str(price_model) if price_model else None,
                price_provider=str(spec.get("price_provider", "openai")),
                local=bool(spec.get("local", False)), schema_style=style,
                max_tokens_field=str(spec.get("max_tokens_field", "max_completion_tokens")),
                send_temperature=bool(spec.get("send_temperature", False)))
        if not getattr(built[name], "model", ""):
            raise ConfigError(f"{policy.source}: providers.{name}.model is required")
    return built
