"""Structured output negotiated with OpenAI-compatible servers.

* llama-cpp-python's own server (``python -m llama_cpp.server``), serving the shipped
  GGUF under the name ``gpt-5``, refuses ``json_schema``: with only ``OPENAI_API_KEY``
  and ``OPENAI_BASE_URL`` pointing at it, ARCHITECT's plan for a critical event is
  still made by it (as ``json_object``), not by the local fallback, and priced as gpt-5.
* :class:`FormatServer` takes only the forms it is told to: a ``json_schema`` server is
  never negotiated with; one that takes no response_format gets the schema in the
  prompt, its answer checked, and one repair; the second call goes straight to the
  form that worked.
* Errors that do not refuse the form (401, 429, a plain 500) go to the router as they
  did.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from tests.agents.models.servers import (
    HTTP_500,
    NO_FORMAT,
    Fault,
    FaultServer,
    FormatServer,
    LlamaServer,
    need,
)
from tests.agents.models.test_providers import REQUEST, SCHEMA, Wire, answer_of
from trinity.agents.architect import Architect
from trinity.agents.delegates import Plan, parse_as, schema_of
from trinity.agents.models.policy import build_providers, load_policy, parse_policy
from trinity.agents.models.providers.openai_api import (
    JSON_OBJECT,
    JSON_SCHEMA,
    PROMPT,
    OpenAIProvider,
    checked_answer,
    forget_negotiated,
    negotiated_form,
    schema_problem,
)
from trinity.agents.models.router import CallContext, Router
from trinity.contract import CRITICAL_ERROR
from trinity.errors import AllModelsFailed, ConfigError, ModelHTTPError
from trinity.settings import Settings
from trinity.stores.costs import CostLedger

LOGGER = "trinity.agents.models.providers.openai_api"
KEY = "sk-local-test"


def gpt5_usd(input_tokens: int, output_tokens: int) -> float:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return float(calc_price(usage, model_ref="gpt-5", provider_id="openai").total_price)


def accepted_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == LOGGER and "takes structured output" in r.getMessage()]


@pytest.fixture(autouse=True)
def fresh_negotiation() -> Iterator[None]:
    """Every test starts with no server's form known (the cache lives in the process)."""
    forget_negotiated()
    yield
    forget_negotiated()


@pytest.fixture(scope="module")
def gpt5_server() -> Iterator[LlamaServer]:
    need(importlib.util.find_spec("uvicorn") is not None
         and importlib.util.find_spec("sse_starlette") is not None,
         "llama_cpp.server needs the llama-cpp-python[server] extra")
    server = LlamaServer(alias="gpt-5")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def format_server(accepts: set[str], **kwargs: Any) -> Iterator[FormatServer]:
    server = FormatServer(accepts, **kwargs).start()
    yield server
    server.stop()


@pytest.fixture
def schema_only() -> Iterator[FormatServer]:
    yield from format_server({JSON_SCHEMA})


@pytest.fixture
def object_only() -> Iterator[FormatServer]:
    yield from format_server({JSON_OBJECT})


@pytest.fixture
def no_format() -> Iterator[FormatServer]:
    yield from format_server({NO_FORMAT})


def cloud_router(base_url: str, ledger: CostLedger, *, schema_style: str | None = None,
                 max_attempts: int = 1) -> Router:
    """A route of one provider, ``cloud``: gpt-5 at ``base_url``, priced as gpt-5."""
    spec: dict[str, Any] = {"kind": "openai", "model": "gpt-5", "api_key_env": "OPENAI_API_KEY",
                            "base_url_env": "OPENAI_BASE_URL", "price_model": "gpt-5"}
    if schema_style is not None:
        spec["schema_style"] = schema_style
    policy = parse_policy({"call": {"timeout_s": 10, "max_attempts": max_attempts,
                                    "backoff_s": [0]},
                           "providers": {"cloud": spec}, "routes": [{"chain": ["cloud"]}]},
                          "test policy")
    providers = build_providers(policy, {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": base_url})
    return Router(policy, providers, ledger, budget_usd=10.0, sleep=lambda s: None)


# -- (a) llama_cpp.server under the name gpt-5, configured by the two variables only ----


def test_llama_cpp_server_named_gpt5_plans_critical_events_and_is_priced_as_gpt5(
    gpt5_server: LlamaServer, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # The shipped policy, and nothing set but the two variables: no Ollama, so the
    # critical route is [cloud, embedded] and a cloud failure would be planned locally.
    policy = load_policy()
    providers = build_providers(policy, {"OPENAI_API_KEY": KEY,
                                         "OPENAI_BASE_URL": gpt5_server.base_url})
    cloud = providers["cloud"]
    assert isinstance(cloud, OpenAIProvider) and cloud.schema_style == "auto"
    wire = Wire()
    cloud._client = wire.client(cloud)  # the official client, with a tap on the wire
    ledger = CostLedger(short_dir / "costs.db")
    router = Router(policy, providers, ledger, budget_usd=10.0, sleep=lambda s: None)
    architect = Architect(Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)}))
    architect.policy = policy

    def plan(event_id: str) -> Any:
        signal = {"event_id": event_id, "pattern": CRITICAL_ERROR, "severity": "critical",
                  "confidence": 0.97, "file": "api/handlers.py", "line": 88,
                  "error_type": "TypeError",
                  "message": "TypeError: Cannot read properties of undefined (reading 'id')"}
        ctx = CallContext("architect", f"architect:{event_id}", run_id="run-1",
                          event_id=event_id, pattern=CRITICAL_ERROR, severity="critical")
        return router.call(architect.request_for(signal), ctx, parse_as(Plan))

    try:
        first = plan("ev-1")
        rows_first = ledger.calls()
        wire_first = list(wire.requests)
        second = plan("ev-2")
        rows = ledger.calls()
    finally:
        router.close()
        ledger.close()

    # Made by that server, not by the local fallback.
    assert (first.provider, first.model) == ("cloud", "gpt-5")
    assert first.value["tasks"] and first.value["summary"]
    assert {r["provider"] for r in rows} == {"cloud"}
    # Negotiated: json_schema refused (HTTP 500), json_object taken.
    assert [r["response_format"]["type"] for r in wire_first] == [JSON_SCHEMA, JSON_OBJECT]
    assert wire_first[1]["response_format"]["schema"] == schema_of(Plan)
    refused, made = rows_first
    assert (refused["status"], refused["error_class"], refused["route"]) == (
        "error", "http_error", "primary")
    assert "refused response_format json_schema; trying json_object" in refused["error"]
    assert "HTTP 500" in refused["error"] and KEY not in refused["error"]
    assert (refused["cost_usd"], refused["input_tokens"], refused["output_tokens"]) == (
        0.0, 0, 0)
    # The plan's row: the server's own usage, priced as gpt-5.
    usage = wire.responses[1]["usage"]
    assert (made["status"], made["route"], made["model"], made["attempt"]) == (
        "success", "retry", "gpt-5", 2)
    assert (made["input_tokens"], made["output_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert made["tokens_estimated"] == 0 and made["input_tokens"] > 50
    assert made["cost_usd"] == pytest.approx(
        gpt5_usd(made["input_tokens"], made["output_tokens"]), abs=1e-12)
    assert made["cost_usd"] > 0

    # (d) against the real server: the second plan goes straight to json_object.
    assert second.provider == "cloud"
    assert [r["response_format"]["type"] for r in wire.requests[2:]] == [JSON_OBJECT]
    (again,) = rows[2:]
    assert (again["status"], again["route"], again["attempt"]) == ("success", "primary", 1)
    assert negotiated_form(gpt5_server.base_url, "gpt-5") == JSON_OBJECT
    # One line in the log says what the server takes, for which URL and model.
    (line,) = accepted_lines(caplog)
    assert line.getMessage() == (
        f"cloud: the server at http://127.0.0.1:{gpt5_server.port}/*** takes structured "
        "output for model gpt-5 as json_object (refused: json_schema)")
    assert line.__dict__["schema_form"] == JSON_OBJECT


# -- (b) a server that takes json_schema ---------------------------------------------------


def test_json_schema_server_is_asked_json_schema_and_never_negotiates(
    schema_only: FormatServer, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ledger = CostLedger(short_dir / "costs.db")
    router = cloud_router(schema_only.base_url, ledger)
    try:
        for n in range(3):
            routed = router.call(REQUEST, CallContext("architect", f"req-{n}"), answer_of)
            assert routed.value == "yes"
    finally:
        router.close()
    rows = ledger.calls()
    ledger.close()
    assert schema_only.forms_asked() == [JSON_SCHEMA] * 3
    assert schema_only.requests[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                               "strict": False}}
    assert [(r["status"], r["route"], r["attempt"]) for r in rows] == [
        ("success", "primary", 1)] * 3
    for row in rows:
        assert row["cost_usd"] == pytest.approx(
            gpt5_usd(row["input_tokens"], row["output_tokens"]), abs=1e-12)
    (line,) = accepted_lines(caplog)
    assert line.getMessage().endswith("for model gpt-5 as json_schema")


# -- (c) a server that takes no response_format ----------------------------------------------


def test_server_without_response_format_gets_the_schema_in_the_prompt_and_one_repair(
    no_format: FormatServer, short_dir: Path
) -> None:
    wrong = '{"answer": "maybe"}'
    no_format.answers.extend([wrong, '```json\n{"answer": "no"}\n```'])
    ledger = CostLedger(short_dir / "costs.db")
    router = cloud_router(no_format.base_url, ledger)
    try:
        routed = router.call(REQUEST, CallContext("architect", "req-prompt"), answer_of)
    finally:
        router.close()
    rows = ledger.calls()
    totals = ledger.totals()
    ledger.close()
    # The fenced answer is taken out of its fence and is the schema's.
    assert routed.value == "no"
    assert no_format.forms_asked() == [JSON_SCHEMA, JSON_OBJECT, NO_FORMAT, NO_FORMAT]
    _, _, asked, repair = no_format.requests
    # The schema is in the system message; the user's message is unchanged.
    system = asked["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Answer in JSON.")
    assert json.dumps(SCHEMA, separators=(",", ":")) in system["content"]
    assert asked["messages"][1:] == list(REQUEST.messages[1:])
    # The repair quotes the wrong answer and what is wrong with it.
    assert repair["messages"][:2] == asked["messages"]
    assert repair["messages"][2] == {"role": "assistant", "content": wrong}
    assert "answer.answer: 'maybe' is not one of ['yes', 'no']" in repair["messages"][3]["content"]

    # Every request is a row, each priced from its own tokens.
    assert [(r["status"], r["error_class"], r["route"], r["attempt"]) for r in rows] == [
        ("error", "http_error", "primary", 1), ("error", "http_error", "retry", 2),
        ("error", "invalid_output", "retry", 3), ("success", None, "retry", 4)]
    assert "refused response_format json_schema; trying json_object" in rows[0]["error"]
    assert "refused response_format json_object; trying prompt" in rows[1]["error"]
    assert "answer does not match the schema" in rows[2]["error"]
    for row, request in zip(rows[2:], (asked, repair), strict=True):
        prompt = "".join(m["content"] for m in request["messages"])
        assert row["input_tokens"] == len(prompt) // 4 and row["tokens_estimated"] == 0
        assert row["cost_usd"] == pytest.approx(
            gpt5_usd(row["input_tokens"], row["output_tokens"]), abs=1e-12)
        assert row["cost_usd"] > 0
    assert [r["cost_usd"] for r in rows[:2]] == [0.0, 0.0]
    assert totals["total_cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows), abs=1e-6)
    assert negotiated_form(no_format.base_url, "gpt-5") == PROMPT


def test_a_second_wrong_answer_fails_the_attempt_and_the_retry_asks_in_the_prompt(
    no_format: FormatServer, short_dir: Path
) -> None:
    no_format.answers.extend(["yes", "yes!", '{"answer": "yes"}'])
    ledger = CostLedger(short_dir / "costs.db")
    router = cloud_router(no_format.base_url, ledger, max_attempts=2)
    try:
        routed = router.call(REQUEST, CallContext("architect", "req-twice"), answer_of)
    finally:
        router.close()
    rows = ledger.calls()
    ledger.close()
    assert routed.value == "yes"
    # Attempt 1: two refusals, the answer, its repair (also wrong: the router's parser
    # says so, with its tokens); attempt 2 goes straight to the prompt form.
    assert no_format.forms_asked() == [JSON_SCHEMA, JSON_OBJECT] + [NO_FORMAT] * 3
    assert [(r["status"], r["error_class"]) for r in rows] == [
        ("error", "http_error"), ("error", "http_error"), ("error", "invalid_output"),
        ("error", "invalid_output"), ("success", None)]
    assert "the answer is not JSON" in rows[2]["error"]
    assert rows[3]["error"].startswith("answer is not JSON") and rows[3]["output_tokens"]
    assert [r["attempt"] for r in rows] == [1, 2, 3, 4, 5]


# -- (d) what worked is remembered ---------------------------------------------------------


def test_the_second_call_goes_straight_to_the_form_that_worked(
    object_only: FormatServer, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ledger = CostLedger(short_dir / "costs.db")
    router = cloud_router(object_only.base_url, ledger)
    try:
        router.call(REQUEST, CallContext("architect", "req-1"), answer_of)
    finally:
        router.close()
    assert object_only.forms_asked() == [JSON_SCHEMA, JSON_OBJECT]
    # Another router and provider for the same server and model (another agent's call in
    # the same process): no negotiation.
    router = cloud_router(object_only.base_url + "/", ledger)
    try:
        routed = router.call(REQUEST, CallContext("executor", "req-2"), answer_of)
    finally:
        router.close()
    rows = ledger.calls()
    ledger.close()
    assert routed.value == "yes"
    assert object_only.forms_asked() == [JSON_SCHEMA, JSON_OBJECT, JSON_OBJECT]
    assert object_only.requests[-1]["repeat_penalty"] == 1.0
    assert [(r["request_id"], r["status"], r["route"]) for r in rows] == [
        ("req-1", "error", "primary"), ("req-1", "success", "retry"),
        ("req-2", "success", "primary")]
    assert len(accepted_lines(caplog)) == 1


def test_a_configured_schema_style_is_tried_first(
    object_only: FormatServer, schema_only: FormatServer, short_dir: Path
) -> None:
    ledger = CostLedger(short_dir / "costs.db")
    try:
        for server in (object_only, schema_only):
            router = cloud_router(server.base_url, ledger, schema_style=JSON_OBJECT)
            try:
                router.call(REQUEST, CallContext("architect", f"req-{server.port}"), answer_of)
            finally:
                router.close()
    finally:
        ledger.close()
    assert object_only.forms_asked() == [JSON_OBJECT]
    # Pinned but refused: the rest of the order is still tried.
    assert schema_only.forms_asked() == [JSON_OBJECT, JSON_SCHEMA]


# -- what is not a refusal of the form --------------------------------------------------------


@pytest.mark.parametrize("status", [401, 429, 503])
def test_errors_that_do_not_refuse_the_form_go_to_the_router(
    schema_only: FormatServer, status: int, short_dir: Path
) -> None:
    """The error body names response_format, yet the status is about the key, the rate
    or the server: no other form is tried, and nothing is remembered."""
    schema_only.fail_with.append(status)
    ledger = CostLedger(short_dir / "costs.db")
    router = cloud_router(schema_only.base_url, ledger)
    try:
        with pytest.raises(AllModelsFailed, match=f"HTTP {status}"):
            router.call(REQUEST, CallContext("architect", "req-failed"), answer_of)
        routed = router.call(REQUEST, CallContext("architect", "req-after"), answer_of)
    finally:
        router.close()
    rows = ledger.calls()
    ledger.close()
    assert routed.value == "yes"
    assert schema_only.forms_asked() == [JSON_SCHEMA, JSON_SCHEMA]
    assert [(r["status"], r["error_class"]) for r in rows] == [
        ("error", "http_error"), ("success", None)]


def test_a_500_is_a_refusal_only_when_it_names_the_form(
    object_only: FormatServer, faults: FaultServer
) -> None:
    """llama_cpp.server refuses a form with a 500 naming response_format; a 500 that
    names nothing of the kind is the server's own error, answered once."""
    object_only.refusal_status = 500
    named = OpenAIProvider("cloud", model="gpt-5", api_key=KEY, base_url=object_only.base_url,
                           price_model="gpt-5")
    plain = OpenAIProvider("cloud", model="gpt-5", api_key=KEY, base_url=faults.base_url,
                           price_model="gpt-5")
    faults.program(Fault(HTTP_500))
    try:
        assert answer_of(named.complete(REQUEST, timeout_s=5, cancel=threading.Event())) == "yes"
        with pytest.raises(ModelHTTPError, match="HTTP 500: .*internal server error"):
            plain.complete(REQUEST, timeout_s=5, cancel=threading.Event())
        assert answer_of(plain.complete(REQUEST, timeout_s=5, cancel=threading.Event())) == "yes"
    finally:
        named.close()
        plain.close()
    assert object_only.forms_asked() == [JSON_SCHEMA, JSON_OBJECT]
    assert [body["response_format"]["type"] for _, body in faults.hits] == [JSON_SCHEMA] * 2
    assert negotiated_form(faults.base_url, "gpt-5") == JSON_SCHEMA


# -- the pieces ---------------------------------------------------------------------------


def test_schema_problem_names_the_first_way_an_answer_breaks_the_plan_schema() -> None:
    schema = schema_of(Plan)
    task = {"description": "Guard the missing id", "acceptance": "Test passes"}
    good = {"summary": "Fix the crash", "steps": ["Add a guard"], "tasks": [task]}
    assert schema_problem(good, schema) is None
    cases = [
        ({**good, "steps": []}, "answer.steps: [] should be non-empty"),
        ({**good, "summary": "x" * 81}, f"answer.summary: '{'x' * 81}' is too long"),
        ({**good, "tasks": [{"description": "Guard it"}]},
         "answer.tasks.0: 'acceptance' is a required property"),
        ({**good, "tasks": [{**task, "owner": "me"}]},
         "answer.tasks.0: Additional properties are not allowed ('owner' was unexpected)"),
        ({**good, "steps": "Add a guard"}, "answer.steps: 'Add a guard' is not of type 'array'"),
        ([{}], "answer: [{}] is not of type 'object'"),
    ]
    for value, problem in cases:
        assert schema_problem(value, schema) == problem
    assert schema_problem(True, {"type": "integer"}) == "answer: True is not of type 'integer'"
    assert schema_problem(3, {"anyOf": [{"type": "string"}, {"type": "null"}]}) == (
        "answer: 3 is not valid under any of the given schemas")


def test_checked_answer_takes_the_object_out_of_a_fence_or_prose() -> None:
    assert checked_answer('```json\n{"answer": "yes"}\n```', SCHEMA) == ('{"answer": "yes"}', None)
    assert checked_answer('Sure: {"answer": "no"} - done', SCHEMA) == ('{"answer": "no"}', None)
    text, problem = checked_answer("yes", SCHEMA)
    assert text == "yes" and problem is not None and problem.startswith("the answer is not JSON")


def test_schema_style_is_checked_and_defaults_to_auto() -> None:
    def cloud(**spec: Any) -> Any:
        policy = parse_policy({"providers": {"cloud": {"kind": "openai", "model": "gpt-5",
                                                       **spec}},
                               "routes": [{"chain": ["cloud"]}]}, "test policy")
        return build_providers(policy, {})["cloud"]

    assert cloud().forms == (JSON_SCHEMA, JSON_OBJECT, PROMPT)
    assert cloud(schema_style="json_object").forms == (JSON_OBJECT, JSON_SCHEMA, PROMPT)
    assert cloud(schema_style="prompt").forms == (PROMPT, JSON_SCHEMA, JSON_OBJECT)
    with pytest.raises(ConfigError, match="schema_style must be one of auto, json_schema, "
                                          "json_object, prompt, got 'xml'"):
        cloud(schema_style="xml")
