"""The ollama provider: an Ollama server through the official ``ollama`` client.

Usage comes from the response (``prompt_eval_count``, ``eval_count``). Ollama omits
``prompt_eval_count`` when the whole prompt was served from its cache; the prompt is
then counted with the shipped tokenizer and the row marked estimated.
"""

from __future__ import annotations

import threading
from typing import Any

from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.agents.models.providers.model_file import estimate_tokens
from trinity.errors import InvalidModelOutput, ModelHTTPError, ModelTimeout, ModelUnavailable


class OllamaProvider:
    kind = "ollama"
    local = True
    price_model: str | None = None
    price_provider: str | None = None

    def __init__(self, name: str, *, model: str, host: str | None) -> None:
        self.name = name
        self.model = model
        self.host = host

    def unavailable_reason(self) -> str | None:
        return None if self.host else "no Ollama host (set OLLAMA_HOST)"

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion:
        import httpx  # imported when first used: an unconfigured provider costs no memory
        import ollama

        client = ollama.Client(host=self.host, timeout=timeout_s)
        try:
            response = client.chat(
                model=self.model,
                messages=list(request.messages),
                format=request.schema,
                options={"num_predict": request.max_tokens,
                         "temperature": request.temperature, "seed": request.seed},
                stream=False,
            )
        except ollama.ResponseError as exc:
            raise ModelHTTPError(f"{self.name}: HTTP {exc.status_code}: {exc.error}",
                                 exc.status_code) from None
        except httpx.TimeoutException:
            raise ModelTimeout(f"{self.name}: no answer within {timeout_s:g} s") from None
        except (httpx.TransportError, ConnectionError) as exc:
            raise ModelUnavailable(f"{self.name}: cannot reach {self.host}: {exc}") from None
        except (ValueError, TypeError) as exc:  # a body that is not Ollama's JSON
            raise InvalidModelOutput(f"{self.name}: unreadable response: {exc}") from None
        finally:
            client._client.close()
        content = response.message.content or ""
        prompt = response.prompt_eval_count
        output = response.eval_count
        estimated = prompt is None or output is None
        usage = TokenUsage(
            prompt if prompt is not None else estimate_tokens(request.prompt_text()),
            output if output is not None else estimate_tokens(content),
            estimated=estimated,
        )
        extra: dict[str, Any] = {}
        if response.total_duration:
            extra["server_ms"] = response.total_duration / 1e6
        return Completion(content, usage, response.model or self.model,
                          response.done_reason, extra)

    def close(self) -> None:
        pass
