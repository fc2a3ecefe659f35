"""Each provider against a real server (acceptance 2) and its error mapping (acceptance 3).

* embedded: llama.cpp in process; its usage equals what llama.cpp reports for the
  same request.
* openai: llama-cpp-python's own OpenAI-compatible server with the same GGUF, through
  the official client; usage read from the response and priced as ``gpt-5``.
* ollama: a server speaking Ollama's ``/api/tags`` and ``/api/chat`` wire format,
  answering with the real model; usage from ``prompt_eval_count``/``eval_count``.
* faults: timeout, 500, bodies that are not a chat answer, connection refused.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from genai_prices import Usage, calc_price

from tests.agents.models.servers import (
    BAD_CONTENT,
    HTTP_500,
    LLAMA_ALIAS,
    NOT_JSON,
    OLLAMA_MODEL,
    SLOW,
    TEXT_BODY,
    WRONG_SHAPE,
    Fault,
    FaultServer,
    LlamaServer,
    OllamaWireServer,
    need,
)
from trinity.agents.models.policy import build_providers, parse_policy
from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.agents.models.providers.embedded import (
    KV_CACHE_TYPE,
    EmbeddedProvider,
    estimate_tokens,
)
from trinity.agents.models.providers.ollama_api import OllamaProvider
from trinity.agents.models.providers.openai_api import OpenAIProvider
from trinity.agents.models.router import CallContext, Router
from trinity.errors import (
    InvalidModelOutput,
    ModelError,
    ModelHTTPError,
    ModelTimeout,
    ModelUnavailable,
)
from trinity.stores.costs import CostLedger

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
REQUEST = ChatRequest(
    messages=({"role": "system", "content": "Answer in JSON."},
              {"role": "user", "content": "Is water wet? Answer yes or no."}),
    schema=SCHEMA, max_tokens=48, temperature=0.0, seed=7)


def answer_of(completion: Completion) -> str:
    value = completion.json()
    if not isinstance(value, dict) or set(value) != {"answer"} \
            or value["answer"] not in ("yes", "no"):
        raise InvalidModelOutput(f"not the schema's answer: {completion.content!r}")
    return str(value["answer"])


def gpt5_usd(input_tokens: int, output_tokens: int) -> float:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return float(calc_price(usage, model_ref="gpt-5", provider_id="openai").total_price)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedProvider]:
    provider = EmbeddedProvider("embedded", n_threads=1)
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def twin(embedded: EmbeddedProvider) -> Iterator[Any]:
    """A second Llama with every setting of the provider's (KV cache type, n_batch, ...)."""
    from llama_cpp import Llama

    llama = Llama(**embedded._load().__getstate__())
    yield llama
    llama.close()


@pytest.fixture(scope="module")
def ollama_server() -> Iterator[OllamaWireServer]:
    server = OllamaWireServer().start()
    yield server
    server.stop()
    server.llama.close()


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    need(importlib.util.find_spec("uvicorn") is not None
         and importlib.util.find_spec("sse_starlette") is not None,
         "llama_cpp.server needs the llama-cpp-python[server] extra")
    server = LlamaServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def never() -> threading.Event:
    return threading.Event()


# -- embedded -------------------------------------------------------------------------


def test_embedded_usage_is_what_llama_cpp_reports(
    embedded: EmbeddedProvider, ollama_server: OllamaWireServer
) -> None:
    completion = embedded.complete(REQUEST, timeout_s=30, cancel=never())
    # The same request, not streamed, through another llama.cpp instance of the GGUF.
    with ollama_server.lock:
        reference: Any = ollama_server.llama.create_chat_completion(
            messages=list(REQUEST.messages),
            response_format={"type": "json_object", "schema": SCHEMA},
            max_tokens=REQUEST.max_tokens, temperature=REQUEST.temperature, seed=REQUEST.seed)
    assert completion.content == reference["choices"][0]["message"]["content"]
    assert completion.usage == TokenUsage(reference["usage"]["prompt_tokens"],
                                          reference["usage"]["completion_tokens"])
    assert completion.usage.input_tokens > 20 and completion.usage.output_tokens > 2
    assert completion.finish_reason == "stop"
    assert answer_of(completion) in ("yes", "no")


PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string"},
                   "steps": {"type": "array", "items": {"type": "string"}},
                   "risk": {"type": "number"}, "ready": {"type": "boolean"}},
    "required": ["summary", "steps", "risk", "ready"],
}


@pytest.mark.parametrize("temperature", [0.0, 0.2, 0.8])
def test_embedded_grammar_mask_samples_what_the_grammar_sampler_samples(
    embedded: EmbeddedProvider, twin: Any, temperature: float
) -> None:
    """The provider checks only the most likely tokens against the grammar (see
    ``_GrammarMask``); a llama.cpp grammar sampler over the whole vocabulary, in another
    instance built with the provider's own settings, samples the same tokens: free text
    inside strings (where nearly every token is allowed), structure, numbers and
    booleans, seeded draws."""
    from trinity.agents.models.providers.embedded import schema_grammar

    prompts = ["Plan a fix: TypeError: Cannot read properties of undefined (reading 'id')",
               "Plan tests for a network client whose retries time out at random.",
               "Summarise in one line: duplicate validation logic in three files."]
    for seed, prompt in enumerate(prompts):
        messages = ({"role": "user", "content": prompt},)
        request = ChatRequest(messages=messages, schema=PLAN_SCHEMA, max_tokens=96,
                              temperature=temperature, seed=seed)
        completion = embedded.complete(request, timeout_s=120, cancel=never())
        reference: Any = twin.create_chat_completion(
            messages=list(messages), grammar=schema_grammar(PLAN_SCHEMA),
            max_tokens=96, temperature=temperature, seed=seed)
        assert completion.content == reference["choices"][0]["message"]["content"]
        assert completion.usage.output_tokens == reference["usage"]["completion_tokens"]


def test_embedded_kv_cache_is_8_bit(embedded: EmbeddedProvider) -> None:
    """The model agents' KV cache is Q8_0 (half of F16's memory), with flash attention,
    which llama.cpp needs to quantize V; the answers above are unchanged by it."""
    embedded.complete(REQUEST, timeout_s=30, cancel=never())
    params = embedded._llama.context_params
    assert (params.type_k, params.type_v) == (KV_CACHE_TYPE, KV_CACHE_TYPE) == (8, 8)
    assert params.flash_attn_type == 1  # enabled


def test_embedded_call_leaves_no_cyclic_garbage(embedded: EmbeddedProvider) -> None:
    """A call's sampler chain (llama-cpp-python's sampler, the closure over the logits
    processors, the grammar mask) is a reference cycle, ~1.1 MB a call; the provider
    collects it before returning instead of leaving it to the cyclic collector, which
    let a model agent's heap climb by up to 9 MB between collections."""
    request = ChatRequest(messages=({"role": "user", "content": "Plan a small fix."},),
                          schema=PLAN_SCHEMA, max_tokens=24, temperature=0.0, seed=0)
    gc.collect()
    for _ in range(2):
        embedded.complete(request, timeout_s=60, cancel=never())
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert "_GrammarMask" not in left and "CustomSampler" not in left, left


def test_embedded_prompt_longer_than_the_window_is_shortened_to_fit(
    embedded: EmbeddedProvider
) -> None:
    """A prompt that would not fit beside its answer in the context window keeps its
    head and the call still answers (llama.cpp alone refuses it); a prompt whose other
    messages alone overflow the window is a clear error, not a crash."""
    from trinity.agents.models.providers.embedded import DEFAULT_N_CTX

    assert embedded.n_ctx == DEFAULT_N_CTX
    # ASCII, CJK and emoji: ~5000 tokens, far more than the window.
    long_text = "Traceback line 42: KeyError 'user_id' 键错误 🔥 " * 400
    assert embedded.count_tokens(long_text) > 3 * DEFAULT_N_CTX
    request = ChatRequest(
        messages=({"role": "system", "content": "Answer in JSON."},
                  {"role": "user", "content": "Is this an error? Answer yes or no.\n"
                                              + long_text}),
        schema=SCHEMA, max_tokens=48, temperature=0.0, seed=7)
    completion = embedded.complete(request, timeout_s=120, cancel=never())
    assert answer_of(completion) in ("yes", "no")
    room = DEFAULT_N_CTX - request.max_tokens
    # All of the room is used, and no more.
    assert room - 32 <= completion.usage.input_tokens <= room

    too_long = ChatRequest(messages=({"role": "system", "content": long_text},
                                     {"role": "user", "content": "yes or no?"}),
                           schema=SCHEMA, max_tokens=48)
    with pytest.raises(InvalidModelOutput, match="context window of 1024"):
        embedded.complete(too_long, timeout_s=30, cancel=never())


def test_a_window_too_small_for_the_answers_is_a_config_error() -> None:
    from trinity.errors import ConfigError

    def with_window(n_ctx: int) -> Any:
        return parse_policy({"providers": {"embedded": {"kind": "embedded", "n_ctx": n_ctx}},
                             "agents": {"architect": {"max_tokens": 480}},
                             "routes": [{"chain": ["embedded"]}]}, "test policy")

    assert with_window(960).providers["embedded"]["n_ctx"] == 960
    with pytest.raises(ConfigError, match="n_ctx = 900 leaves no room .* at least 960"):
        with_window(900)
    with pytest.raises(ConfigError, match="n_ctx must be a number"):
        with_window("big")  # type: ignore[arg-type]


def test_embedded_timeout_and_cancel_are_model_timeouts(embedded: EmbeddedProvider) -> None:
    with pytest.raises(ModelTimeout, match="no answer within"):
        embedded.complete(REQUEST, timeout_s=1e-6, cancel=never())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ModelTimeout, match="cancelled"):
        embedded.complete(REQUEST, timeout_s=30, cancel=cancel)


# -- openai, against llama-cpp-python's own server --------------------------------------


class Wire:
    """The raw HTTP exchanges of an openai client (httpx event hooks)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.responses: list[Any] = []

    def on_request(self, request: httpx.Request) -> None:
        self.requests.append(json.loads(request.content))

    def on_response(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append(response.json())

    def client(self, provider: OpenAIProvider) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=provider.api_key, base_url=provider.base_url, max_retries=0,
            http_client=httpx.Client(event_hooks={"request": [self.on_request],
                                                  "response": [self.on_response]}))


def test_openai_provider_against_llama_cpp_server_is_priced_as_configured(
    llama_server: LlamaServer, embedded: EmbeddedProvider, short_dir: Path
) -> None:
    policy = parse_policy({
        "call": {"timeout_s": 30, "max_attempts": 1},
        "providers": {"llamacpp": {
            "kind": "openai", "model": LLAMA_ALIAS, "api_key_env": "LLAMA_KEY",
            "base_url_env": "LLAMA_URL", "price_model": "gpt-5", "price_provider": "openai",
            "schema_style": "json_object", "max_tokens_field": "max_tokens",
            "send_temperature": True}},
        "routes": [{"chain": ["llamacpp"]}],
    }, "test")
    providers = build_providers(policy, {"LLAMA_KEY": "sk-local",
                                         "LLAMA_URL": llama_server.base_url})
    provider = providers["llamacpp"]
    assert isinstance(provider, OpenAIProvider)
    wire = Wire()
    provider._client = wire.client(provider)  # the official client, with a tap on the wire
    ledger = CostLedger(short_dir / "costs.db")
    router = Router(policy, providers, ledger, budget_usd=10.0, sleep=lambda s: None)
    try:
        routed = router.call(REQUEST, CallContext("architect", "req-openai"),
                             lambda c: answer_of(c))
    finally:
        router.close()
    assert routed.value in ("yes", "no") and routed.provider == "llamacpp"

    # What went over the wire: llama.cpp's dialect of the schema, the limits.
    (sent,) = wire.requests
    assert sent["model"] == LLAMA_ALIAS
    assert sent["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert sent["max_tokens"] == 48 and sent["temperature"] == 0.0
    assert sent["repeat_penalty"] == 1.0
    (answer,) = wire.responses
    usage = answer["usage"]

    (row,) = ledger.calls()
    ledger.close()
    assert (row["status"], row["route"], row["provider"], row["provider_kind"]) == (
        "success", "primary", "llamacpp", "openai")
    assert row["model"] == LLAMA_ALIAS
    # Usage is the server's, not an estimate ...
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert row["tokens_estimated"] == 0
    # ... the same model and chat template as the embedded provider: the same prompt.
    local = embedded.complete(REQUEST, timeout_s=30, cancel=never())
    assert row["input_tokens"] == local.usage.input_tokens
    # ... and priced as the configured model.
    assert row["cost_usd"] == pytest.approx(gpt5_usd(usage["prompt_tokens"],
                                                     usage["completion_tokens"]), abs=1e-12)
    assert row["cost_usd"] > 0


def test_openai_server_lists_the_model(llama_server: LlamaServer) -> None:
    client = openai.OpenAI(api_key="sk-local", base_url=llama_server.base_url, max_retries=0)
    try:
        assert [m.id for m in client.models.list()] == [LLAMA_ALIAS]
    finally:
        client.close()


# -- ollama, against a server speaking its wire format ---------------------------------


def test_ollama_provider_reads_usage_from_the_server(ollama_server: OllamaWireServer) -> None:
    client = ollama.Client(host=ollama_server.url)
    try:
        assert [m.model for m in client.list().models] == [OLLAMA_MODEL]
    finally:
        client._client.close()

    provider = OllamaProvider("ollama", model=OLLAMA_MODEL, host=ollama_server.url)
    completion = provider.complete(REQUEST, timeout_s=30, cancel=never())
    sent, answered = ollama_server.requests[-1], ollama_server.responses[-1]
    assert sent["format"] == SCHEMA and sent["stream"] is False
    assert sent["options"] == {"num_predict": 48, "temperature": 0.0, "seed": 7}
    assert completion.usage == TokenUsage(answered["prompt_eval_count"],
                                          answered["eval_count"])
    assert completion.usage.input_tokens > 20 and not completion.usage.estimated
    assert completion.model == OLLAMA_MODEL and completion.finish_reason == "stop"
    assert completion.extra["server_ms"] == pytest.approx(answered["total_duration"] / 1e6)
    assert answer_of(completion) in ("yes", "no")


def test_ollama_cached_prompt_is_counted_here_and_marked_estimated(
    ollama_server: OllamaWireServer, short_dir: Path
) -> None:
    policy = parse_policy({"call": {"max_attempts": 1},
                           "providers": {"ollama": {"kind": "ollama", "model": OLLAMA_MODEL}},
                           "routes": [{"chain": ["ollama"]}]}, "test")
    provider = OllamaProvider("ollama", model=OLLAMA_MODEL, host=ollama_server.url)
    ledger = CostLedger(short_dir / "costs.db")
    router = Router(policy, {"ollama": provider}, ledger, budget_usd=1.0)
    ollama_server.omit_prompt_eval_count = True
    try:
        routed = router.call(REQUEST, CallContext("executor", "req-ollama"), answer_of)
    finally:
        ollama_server.omit_prompt_eval_count = False
    answered = ollama_server.responses[-1]
    assert "prompt_eval_count" not in answered
    (row,) = ledger.calls()
    ledger.close()
    assert routed.value in ("yes", "no")
    assert row["tokens_estimated"] == 1
    assert row["input_tokens"] == estimate_tokens(REQUEST.prompt_text())
    assert row["output_tokens"] == answered["eval_count"]
    assert (row["cost_usd"], row["local"], row["status"]) == (0.0, 1, "success")


# -- error mapping ---------------------------------------------------------------------


def openai_on(base_url: str) -> OpenAIProvider:
    return OpenAIProvider("cloud", model="gpt-5", api_key="sk-test", base_url=base_url,
                          price_model="gpt-5")


FAULTS = [
    (SLOW, ModelTimeout, None),
    (HTTP_500, ModelHTTPError, 500),
    (NOT_JSON, InvalidModelOutput, None),
    (TEXT_BODY, InvalidModelOutput, None),
    (WRONG_SHAPE, InvalidModelOutput, None),
]


@pytest.mark.parametrize("kind", ["openai", "ollama"])
@pytest.mark.parametrize(("fault", "error", "status"), FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_map_to_model_errors(
    faults: FaultServer, kind: str, fault: str, error: type[ModelError], status: int | None
) -> None:
    provider: OpenAIProvider | OllamaProvider = (
        openai_on(faults.base_url) if kind == "openai"
        else OllamaProvider("ollama", model=OLLAMA_MODEL, host=faults.url))
    faults.program(Fault(fault, delay_s=5.0))
    started = time.monotonic()
    try:
        with pytest.raises(error) as caught:
            provider.complete(REQUEST, timeout_s=0.5, cancel=never())
    finally:
        provider.close()
    assert type(caught.value) is error
    assert len(faults.hits) == 1  # one call, no hidden client retries
    assert time.monotonic() - started < 4.5  # a timeout did not wait for the server
    if status is not None:
        assert isinstance(caught.value, ModelHTTPError) and caught.value.status == status


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_answer_outside_the_schema_is_invalid_output(faults: FaultServer, kind: str) -> None:
    provider: OpenAIProvider | OllamaProvider = (
        openai_on(faults.base_url) if kind == "openai"
        else OllamaProvider("ollama", model=OLLAMA_MODEL, host=faults.url))
    faults.program(Fault(BAD_CONTENT, prompt_tokens=120, completion_tokens=9))
    try:
        completion = provider.complete(REQUEST, timeout_s=5, cancel=never())
    finally:
        provider.close()
    # A well-formed response: its usage is real (and billed); only the answer is bad.
    assert completion.usage == TokenUsage(120, 9)
    with pytest.raises(InvalidModelOutput, match="not JSON"):
        answer_of(completion)


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_refused_connection_is_unavailable(refused: str, kind: str) -> None:
    url = refused
    provider: OpenAIProvider | OllamaProvider = (
        openai_on(f"{url}/v1") if kind == "openai"
        else OllamaProvider("ollama", model=OLLAMA_MODEL, host=url))
    try:
        with pytest.raises(ModelUnavailable, match="cannot reach"):
            provider.complete(REQUEST, timeout_s=5, cancel=never())
    finally:
        provider.close()


def test_schema_grammar_keeps_control_characters_out_of_strings() -> None:
    """JSON forbids raw control characters in strings; llama-cpp-python's grammar
    allowed them (a raw newline made answers unparseable), ours does not."""
    import json as json_

    from trinity.agents.delegates import ProposedChange, schema_of
    from trinity.agents.models.providers.embedded import schema_grammar, schema_grammar_text

    text = schema_grammar_text(json_.dumps(schema_of(ProposedChange), sort_keys=True))
    (char_rule,) = [line for line in text.splitlines() if line.startswith("char ::=")]
    assert char_rule.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F]'), char_rule
    assert schema_grammar(schema_of(ProposedChange)) is not None  # llama.cpp parses it
