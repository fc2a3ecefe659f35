"""The openai provider: any OpenAI-compatible chat API through the official client.

Usage is read from the response, cached and reasoning tokens included where the
server reports them; without a usage block the tokens are counted with the shipped
tokenizer and the row is marked estimated. The client's own retries are off: the
router retries, so that every attempt reaches the cost ledger.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when first used: an unconfigured provider costs no memory
    import openai

from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.agents.models.providers.embedded import estimate_tokens
from trinity.errors import InvalidModelOutput, ModelHTTPError, ModelTimeout, ModelUnavailable
from trinity.redaction import Redactor, secret_values

# How the answer's schema is asked for: OpenAI's ``json_schema`` response format, or
# the ``json_object`` + ``schema`` form that llama.cpp's server understands.
SCHEMA_STYLES = ("json_schema", "json_object")


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
        schema_style: str = "json_schema",
        max_tokens_field: str = "max_completion_tokens",
        send_temperature: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        self.api_key = api_key
        self.base_url = base_url
        self.price_model = price_model
        self.price_provider = price_provider
        self.local = local
        self.schema_style = schema_style
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

    def _response_format(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.schema_style == "json_object":
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": False}}

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion:
        import openai

        kwargs: dict[str, Any] = {self.max_tokens_field: request.max_tokens}
        if request.schema is not None:
            kwargs["response_format"] = self._response_format(request.schema)
            if self.schema_style == "json_object":
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
            raise ModelHTTPError(self._scrub(f"{self.name}: HTTP {exc.status_code}: {exc.message}"),
                                 exc.status_code) from None
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
