"""The embedding's segment-wise tokenizing against tokenizing each text whole.

``StaticEmbedder`` tokenizes a text's " "-separated segments alone and caches them
(``embedding._segment_rule`` says why that gives the whole text's ids for WITNESS's two
tokenizers). Here both tokenizers' ids must equal the whole-text ids exactly, on any
text, cold and warm and with the cache overflowing; and the vectors must be the mean of
those ids' rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agents.witness.test_features_speed import _ODD_BITS
from trinity.agents.witness import embedding, features
from trinity.agents.witness.dataset import load_devset
from trinity.agents.witness.embedding import MAX_TOKENS, Embedder, StaticEmbedder
from trinity.agents.witness.knowledge import Knowledge
from trinity.agents.witness.text import event_text
from trinity.settings import Settings

# SentencePiece's word marker and special tokens, and runs of spaces, which merge
_METASPACE_BITS = st.sampled_from(
    ["\u2581", "\u2581\u2581", " \u2581", "\u2581 ", "<s>", "</s>", "<unk>", "x<s>y", " <s> ",
     "   ", "\u2581a", "a\u2581", "\t\u2581"])
_TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",))),
    st.lists(st.one_of(_ODD_BITS, _METASPACE_BITS), max_size=60).map("".join),
    st.lists(st.one_of(_ODD_BITS, _METASPACE_BITS), min_size=300, max_size=700).map(" ".join),
)


@pytest.fixture(scope="module")
def parts(embedder: Embedder) -> tuple[StaticEmbedder, ...]:
    return tuple(embedder.parts)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _cold(parts: tuple[StaticEmbedder, ...]) -> Iterator[None]:
    for part in parts:
        part._segments.clear()
    yield
    for part in parts:
        part._segments.clear()


def _whole(part: StaticEmbedder, texts: list[str]) -> list[bytes]:
    encodings = part._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids[:MAX_TOKENS], dtype=np.int32).tobytes() for e in encodings]


def _check(parts: tuple[StaticEmbedder, ...], texts: list[str]) -> None:
    for part in parts:
        ref = _whole(part, texts)
        assert part._ids(texts) == ref  # cold
        assert part._ids(texts) == ref  # warm
        for text, ids in zip(texts, ref, strict=True):
            assert part._ids([text]) == [ids]


def test_both_tokenizers_are_tokenized_by_segment(parts: tuple[StaticEmbedder, ...]) -> None:
    assert [part._rule for part in parts] == [embedding._SPLIT_ANY, embedding._SPLIT_NONEMPTY]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXTS, max_size=6))
def test_segment_ids_are_the_whole_texts_ids(parts: tuple[StaticEmbedder, ...],
                                              texts: list[str]) -> None:
    _check(parts, texts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXTS, max_size=6))
def test_segment_ids_while_the_cache_overflows(parts: tuple[StaticEmbedder, ...],
                                               texts: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "_CACHE_CAP", 3)
        _check(parts, texts)
    assert all(len(part._segments) <= 3 for part in parts)


def test_segment_ids_on_the_devset(parts: tuple[StaticEmbedder, ...]) -> None:
    texts = [event_text(event).text for event, _, _ in load_devset()]
    _check(parts, texts)


def test_a_warm_call_tokenizes_nothing(parts: tuple[StaticEmbedder, ...]) -> None:
    texts = ["Server started on port 8080", "test_upload  is flaky", " indented"]
    expected = [part.embed(texts) for part in parts]
    calls: list[Any] = []

    class Counting:
        def __init__(self, tokenizer: Any) -> None:
            self.tokenizer = tokenizer

        def encode_batch(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return self.tokenizer.encode_batch(*args, **kwargs)

    for part, vectors in zip(parts, expected, strict=True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(part, "_tok", Counting(part._tok))
            # the first two are all segments (a run of spaces stays with the word after
            # it); the third begins with a space, which the SentencePiece tokenizer must
            # see whole
            np.testing.assert_array_equal(part.embed(texts), vectors)
    assert [len(args[0]) for args in calls] == [1]


def test_vectors_are_the_mean_of_the_ids_rows(parts: tuple[StaticEmbedder, ...]) -> None:
    texts = [event_text(event).text for event, _, _ in load_devset()[:200]] + ["", " \u2581 "]
    for part in parts:
        got = part.embed(texts)
        for text, ids, row in zip(texts, _whole(part, texts), got, strict=True):
            rows = part._table[np.frombuffer(ids, dtype=np.int32)]
            if not text.strip() or not len(rows):
                assert not row.any()
                continue
            mean = (rows["q"].astype(np.float64) * rows["s"][:, None]).mean(axis=0)
            np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=2e-6)


def test_forgetting_empties_the_cache(embedder: Embedder,
                                      parts: tuple[StaticEmbedder, ...]) -> None:
    embedder.embed([event_text(event).text for event, _, _ in load_devset()[:100]])
    assert all(part._segments for part in parts)
    embedder.forget_segments()
    assert not any(part._segments for part in parts)


def test_a_fresh_witness_keeps_no_segments_of_its_seed(tmp_path: Path) -> None:
    knowledge = Knowledge.open(Settings.from_env({"TRINITY_DATA_DIR": str(tmp_path)}))
    try:
        assert knowledge.store.exemplar_count() > 1000  # it seeded its store
        assert not any(part._segments for part in knowledge.embedder.parts)  # type: ignore[attr-defined]
    finally:
        knowledge.close()


def test_another_tokenizer_is_tokenized_whole(parts: tuple[StaticEmbedder, ...]) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    for part in parts:
        changed = Tokenizer.from_str(part._tok.to_str())
        changed.pre_tokenizer = pre_tokenizers.Punctuation()
        assert embedding._segment_rule(changed)[0] == embedding._SPLIT_NONE
        changed = Tokenizer.from_str(part._tok.to_str())
        changed.normalizer = normalizers.Lowercase()
        assert embedding._segment_rule(changed)[0] == embedding._SPLIT_NONE
    # a vocabulary token with the word marker inside it could merge across a space
    wordllama = Tokenizer.from_str(parts[1]._tok.to_str())
    wordllama.add_tokens(["x\u2581y"])
    assert embedding._segment_rule(wordllama)[0] == embedding._SPLIT_NONE


def test_segments_up_to_the_cached_length_are_cached_and_longer_ones_are_not(
        parts: tuple[StaticEmbedder, ...]) -> None:
    """A log's long segments (a path, a test id) recur and are cached; one longer than
    ``_CACHED_SEGMENT_CHARS`` is tokenized each time, so an entry's size stays bounded."""
    limit = embedding._CACHED_SEGMENT_CHARS
    path = "src/" + "a" * (limit - len("src/.py") - 3) + "_io.py"
    longer = "lib/" + "b" * limit + ".py"
    assert 32 < len(path) <= limit < len(longer)
    texts = [f"Traceback in {path} line 3", f"error at {longer}"]
    for part in parts:
        ids = part._ids(texts)
        assert path in part._segments and longer not in part._segments
        counting = _Counting(part._tok)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(part, "_tok", counting)
            assert part._ids(texts) == ids
        assert counting.calls == [[longer]]


class _Counting:
    """A tokenizer that notes the texts of each ``encode_batch`` call."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls: list[list[str]] = []

    def encode_batch(self, batch: list[str], **kwargs: Any) -> Any:
        self.calls.append(list(batch))
        return self.tokenizer.encode_batch(batch, **kwargs)
