"""The openai provider: any OpenAI-compatible chat API through the official client.

Usage is read from the response, cached and reasoning tokens included where the
server reports them; without a usage block the tokens are counted with the shipped
tokenizer and the row is marked estimated. The client's own retries are off: the
router retries, so that every attempt reaches the cost ledger.

Structured output is negotiated. Servers that speak the chat-completions protocol do
not all take the same ``response_format``: OpenAI, vLLM, LM Studio and llama.cpp's
``llama-server`` take ``json_schema``; llama-cpp-python's ``llama_cpp.server`` refuses
it (HTTP 500) and takes ``json_object`` with a ``schema``. The forms are tried in the
order ``json_schema`` → ``json_object`` → ``prompt`` (no response_format: the schema is
written into the prompt, the answer validated against it, and a wrong answer sent back
once with the validation error). A configured ``schema_style`` is tried first. Only a
refusal of the form moves on — an error status that names the structured-output
request; an authentication error, a rate limit, a timeout or an unreachable server goes
to the router as it is. What a server (base URL and model) refused is remembered for
the life of the process, so only its first call negotiates, and the form it accepts is
logged once. Each request set aside on the way (a refused form, an answer sent back
for repair) is reported to the router, which writes it to the cost ledger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when first used: an unconfigured provider costs no memory
    import openai

    from trinity.agents.models.router import ReportEarlier

from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.agents.models.providers.model_file import estimate_tokens
from trinity.clock import now_ms
from trinity.errors import InvalidModelOutput, ModelHTTPError, ModelTimeout, ModelUnavailable
from trinity.redaction import Redactor, secret_values
from trinity.urls import redact_url

log = logging.getLogger(__name__)

# How the answer's schema is asked for: OpenAI's ``json_schema`` response format, the
# ``json_object`` + ``schema`` form that llama-cpp-python's server understands, or the
# schema written into the prompt. ``auto`` tries them in this order.
JSON_SCHEMA, JSON_OBJECT, PROMPT = "json_schema", "json_object", "prompt"
FORMS = (JSON_SCHEMA, JSON_OBJECT, PROMPT)
AUTO = "auto"
SCHEMA_STYLES = (AUTO, *FORMS)
OPENAI_BASE_URL = "https://api.openai.com/v1"

# A refusal of the form: a status servers give a request body they do not take (400 and
# 422 from vLLM, LM Studio and LiteLLM's proxy; 500 from llama_cpp.server, whose request
# validation errors come back so; 501) whose error names the structured-output request.
# 401, 403, 404, 408, 429 and 502-504 say nothing about the form.
REFUSAL_STATUSES = frozenset({400, 422, 500, 501})
_FORM_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar",
               "repeat_penalty")


@dataclass
class _ServerForms:
    """What one server (base URL, model) refused, and the form it last accepted."""

    refused: set[str] = field(default_factory=set)
    accepted: str | None = None


_forms_lock = threading.Lock()
_server_forms: dict[tuple[str, str], _ServerForms] = {}


def server_key(base_url: str | None, model: str) -> tuple[str, str]:
    return ((base_url or OPENAI_BASE_URL).rstrip("/"), model)


def negotiated_form(base_url: str | None, model: str) -> str | None:
    """The structured-output form the server last accepted in this process, or None."""
    with _forms_lock:
        state = _server_forms.get(server_key(base_url, model))
        return state.accepted if state else None


def forget_negotiated() -> None:
    """Forget every server's forms (the next call of each negotiates again)."""
    with _forms_lock:
        _server_forms.clear()


class _FormRefused(ModelHTTPError):
    """The server refused the structured-output form (never leaves this module)."""


class OpenAIProvider:
    kind = "openai"

    def __init__(
        self,
        name: str,
        *,
        model: str,
        api_key: str | None,
        base_url: str | None,
        price_model: str | None,
        price_provider: str | None = "openai",
        local: bool = False,
        schema_style: str = AUTO,
        max_tokens_field: str = "max_completion_tokens",
        send_temperature: bool = False,
    ) -> None:
        if schema_style not in SCHEMA_STYLES:
            raise ValueError(f"schema_style must be one of {', '.join(SCHEMA_STYLES)}, "
                             f"got {schema_style!r}")
        self.name = name
        self.model = model
        self.api_key = api_key
        self.base_url = base_url
        self.price_model = price_model
        self.price_provider = price_provider
        self.local = local
        self.schema_style = schema_style
        # The forms in the order tried: a configured one first, then the rest.
        self.forms = FORMS if schema_style == AUTO else (
            schema_style, *(f for f in FORMS if f != schema_style))
        self.max_tokens_field = max_tokens_field
        self.send_temperature = send_temperature
        self._client: openai.OpenAI | None = None

    def unavailable_reason(self) -> str | None:
        return None if self.api_key else "no API key (set OPENAI_API_KEY)"

    def _get_client(self) -> openai.OpenAI:
        import openai

        if self._client is None:
            self._client = openai.OpenAI(api_key=self.api_key, base_url=self.base_url,
                                         max_retries=0)
        return self._client

    # -- negotiation --------------------------------------------------------

    def _server(self) -> _ServerForms:
        """This server's entry (the caller holds ``_forms_lock``)."""
        return _server_forms.setdefault(server_key(self.base_url, self.model), _ServerForms())

    def _form(self) -> str:
        """The first form in this provider's order the server has not refused."""
        with _forms_lock:
            refused = self._server().refused
            return next(f for f in self.forms if f not in refused)

    def _refuse(self, form: str) -> str:
        """Remember that the server refused ``form``; the form to try next."""
        with _forms_lock:
            state = self._server()
            state.refused.add(form)
            if state.accepted == form:
                state.accepted = None
            return next(f for f in self.forms if f not in state.refused)

    def _accept(self, form: str) -> None:
        with _forms_lock:
            state = self._server()
            if state.accepted == form:
                return
            state.accepted = form
            refused = sorted(state.refused)
        where = self._scrub(redact_url(self.base_url or OPENAI_BASE_URL))
        log.info("%s: the server at %s takes structured output for model %s as %s%s",
                 self.name, where, self.model, form,
                 f" (refused: {', '.join(refused)})" if refused else "",
                 extra={"provider": self.name, "base_url": where, "model": self.model,
                        "schema_form": form, "refused_forms": refused})

    # -- calling ------------------------------------------------------------

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion:
        return self.complete_reporting(request, timeout_s=timeout_s, cancel=cancel,
                                       report_earlier=None)

    def complete_reporting(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event,
        report_earlier: ReportEarlier | None,
    ) -> Completion:
        """One answer to ``request``; every request sent and set aside on the way (a
        refused form, an answer sent back for repair) goes to ``report_earlier``. All of
        them together take at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if request.schema is None:
            return self._send(request, None, self._remaining(deadline, timeout_s, cancel))
        while True:
            form = self._form()
            started, ts = time.perf_counter(), now_ms()
            try:
                if form == PROMPT:
                    completion = self._prompted(request, request.schema, deadline, timeout_s,
                                                cancel, report_earlier)
                else:
                    completion = self._send(request, form,
                                            self._remaining(deadline, timeout_s, cancel))
            except _FormRefused as refused:
                next_form = self._refuse(form)
                if report_earlier is not None:
                    report_earlier(ModelHTTPError(
                        f"{self.name}: server refused response_format {form}; trying "
                        f"{next_form}: {refused}", refused.status), None,
                        ts_ms=ts, latency_ms=(time.perf_counter() - started) * 1000)
                continue
            self._accept(form)
            return completion

    def _remaining(self, deadline: float, timeout_s: float, cancel: threading.Event) -> float:
        if cancel.is_set():
            raise ModelTimeout(f"{self.name}: cancelled")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ModelTimeout(f"{self.name}: no answer within {timeout_s:g} s")
        return remaining

    def _prompted(
        self, request: ChatRequest, schema: dict[str, Any], deadline: float, timeout_s: float,
        cancel: threading.Event, report_earlier: ReportEarlier | None,
    ) -> Completion:
        """The schema in the prompt, the answer checked against it, and one repair."""
        asked = dataclasses.replace(request, messages=with_schema(request.messages, schema))
        started, ts = time.perf_counter(), now_ms()
        first = self._send(asked, PROMPT, self._remaining(deadline, timeout_s, cancel))
        text, problem = checked_answer(first.content, schema)
        if problem is None:
            return dataclasses.replace(first, content=text)
        if report_earlier is not None:
            report_earlier(InvalidModelOutput(
                f"{self.name}: answer does not match the schema ({problem}); asking once "
                "more with the error"), first,
                ts_ms=ts, latency_ms=(time.perf_counter() - started) * 1000)
        repair = dataclasses.replace(asked, messages=(
            *asked.messages,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": f"That answer is not valid: {problem}. Answer again "
                                        "with only the corrected JSON object, matching the "
                                        "schema."}))
        second = self._send(repair, PROMPT, self._remaining(deadline, timeout_s, cancel))
        text, problem = checked_answer(second.content, schema)
        # A second wrong answer is returned as it came: the caller's parser says what is
        # wrong with it, and its tokens are still recorded.
        return second if problem is not None else dataclasses.replace(second, content=text)

    def _response_format(self, form: str, schema: dict[str, Any]) -> dict[str, Any]:
        if form == JSON_OBJECT:
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": False}}

    def _send(self, request: ChatRequest, form: str | None, timeout_s: float) -> Completion:
        """One request to the server, asking for ``form`` of structured output (None or
        ``prompt``: no response_format)."""
        import openai

        kwargs: dict[str, Any] = {self.max_tokens_field: request.max_tokens}
        if request.schema is not None and form in (JSON_SCHEMA, JSON_OBJECT):
            kwargs["response_format"] = self._response_format(form, request.schema)
            if form == JSON_OBJECT:
                # llama.cpp's dialect. llama-cpp-python's server applies repeat_penalty
                # 1.1 unless told otherwise, and with a penalty its grammar sampling lets
                # tokens outside the schema through (a raw newline inside a string, text
                # after the object): the answer is then not JSON. 1.0 is no penalty.
                kwargs["extra_body"] = {"repeat_penalty": 1.0}
        if self.send_temperature:
            kwargs["temperature"] = request.temperature
        # A retry asks with another seed (the router's); servers that honour it sample anew.
        kwargs["seed"] = request.seed
        try:
            response = self._get_client().with_options(timeout=timeout_s).chat.completions.create(
                model=self.model, messages=list(request.messages),  # type: ignore[arg-type]
                **kwargs,
            )
        except openai.APITimeoutError:
            raise ModelTimeout(f"{self.name}: no answer within {timeout_s:g} s") from None
        except openai.APIConnectionError as exc:
            raise ModelUnavailable(self._scrub(
                f"{self.name}: cannot reach {self.base_url or 'the API'}: {exc}")) from None
        except openai.APIStatusError as exc:
            message = self._scrub(f"{self.name}: HTTP {exc.status_code}: {exc.message}")
            if "response_format" in kwargs and refuses_form(exc.status_code, exc.message,
                                                            exc.body):
                raise _FormRefused(message, exc.status_code) from None
            raise ModelHTTPError(message, exc.status_code) from None
        except openai.APIResponseValidationError as exc:
            raise InvalidModelOutput(
                self._scrub(f"{self.name}: unreadable response: {exc}")) from None
        except ValueError as exc:  # a 200 whose body is not JSON at all
            raise InvalidModelOutput(
                self._scrub(f"{self.name}: response is not JSON: {exc}")) from None
        # The client does not validate the body: a 200 with a text body comes back as a
        # str, a JSON body of another shape as a half-built object.
        try:
            return self._read(response, request)
        except (AttributeError, TypeError, IndexError, KeyError) as exc:
            raise InvalidModelOutput(f"{self.name}: response is not a chat completion: "
                                     f"{type(exc).__name__}: {exc}") from None

    def _scrub(self, text: str) -> str:
        """Error text from the server or client, without the key: a server may echo it,
        and this text reaches the cost ledger, alerts and logs."""
        return Redactor([self.api_key or "", *secret_values()])(text)

    def _read(self, response: Any, request: ChatRequest) -> Completion:
        if not response.choices:
            raise InvalidModelOutput(f"{self.name}: response without choices")
        choice = response.choices[0]
        content = choice.message.content or ""
        if not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}, not text")
        usage = response.usage
        if usage is None or not isinstance(usage.prompt_tokens, int) or not isinstance(
                usage.completion_tokens, int):
            tokens = TokenUsage(estimate_tokens(request.prompt_text()), estimate_tokens(content),
                                estimated=True)
        else:
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details \
                else None
            reasoning = usage.completion_tokens_details.reasoning_tokens \
                if usage.completion_tokens_details else None
            tokens = TokenUsage(usage.prompt_tokens, usage.completion_tokens,
                                cached_tokens=cached or 0, reasoning_tokens=reasoning or 0)
        return Completion(content, tokens, response.model or self.model, choice.finish_reason)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def refuses_form(status: int, message: str, body: object) -> bool:
    """Whether an error answer to a request with a response_format refuses that form."""
    if status not in REFUSAL_STATUSES:
        return False
    text = f"{message} {json.dumps(body, default=str) if body is not None else ''}".lower()
    return any(word in text for word in _FORM_WORDS)


# -- the schema in the prompt ------------------------------------------------------------


def with_schema(messages: tuple[dict[str, str], ...],
                schema: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    """``messages`` with the answer's JSON schema added to the system message."""
    rule = ("Answer with one JSON object and nothing else: no prose, no code fence. It "
            "must match this JSON schema:\n" + json.dumps(schema, separators=(",", ":")))
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return ({**first, "content": f"{first['content']}\n\n{rule}"}, *messages[1:])
    return ({"role": "system", "content": rule}, *messages)


def checked_answer(content: str, schema: Mapping[str, Any]) -> tuple[str, str | None]:
    """The answer's JSON text (a code fence or text around the object taken off) and
    what is wrong with it against ``schema``, or None."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0].strip()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        start, end = text.find("{"), text.rfind("}")
        try:
            if start < 0 or end < start:
                raise ValueError("no JSON object in the answer")
            text = text[start:end + 1]
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return content, f"the answer is not JSON: {exc}"
    return text, schema_problem(value, schema)


def schema_problem(value: Any, schema: Mapping[str, Any]) -> str | None:
    """The most relevant way ``value`` breaks ``schema`` (jsonschema's ``best_match``),
    as ``answer.<path>: <message>``, or None when it fits."""
    import jsonschema  # imported when first used: only the prompt form checks answers

    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    path = ".".join(["answer", *(str(part) for part in error.absolute_path)])
    return f"{path}: {error.message}"
