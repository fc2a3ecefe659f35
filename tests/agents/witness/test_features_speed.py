"""The cached, batched ``_sparse_features`` against the plain computation it replaced.

``_sparse_features`` assembles a text's hashed columns from per-word and per-segment
cache entries and one sort over a whole batch; ``_reference`` below is the code it
replaced (every n-gram of every text hashed, one row at a time, each text tokenised
whole). They must agree bit for bit, singly and in batches, with the caches cold, warm
and overflowing. (test_detector.py holds both to scikit-learn's HashingVectorizer.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import mmh3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.agents.witness import features
from trinity.agents.witness.dataset import load_devset
from trinity.agents.witness.features import HashedRows, _sparse_features
from trinity.agents.witness.text import event_text, normalise

# -- the reference: the uncached code, as it was ---------------------------------------
_N_HASH = 2**18
_WORD_TOKENS = re.compile(r"(?u)\b\w+\b|[^\w\s]")
_PIECE_TOKENS = re.compile(r"\S+")
_WHITE_SPACES = re.compile(r"\s\s+")
_TOKENIZER: Any = None


def _word_grams(tokens: list[str]) -> list[str]:
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


def _char_wb_grams(text: str) -> list[str]:
    grams: list[str] = []
    for word in _WHITE_SPACES.sub(" ", text).split():
        w = f" {word} "
        for n in range(2, 6):
            if len(w) <= n:
                grams.append(w)
                break
            grams.extend(w[i : i + n] for i in range(len(w) - n + 1))
    return grams


def _hash_block(grams: list[str]) -> np.ndarray:
    hashes = np.fromiter(map(mmh3.hash, grams), dtype=np.int64, count=len(grams))
    columns: np.ndarray = np.unique(np.abs(hashes) % _N_HASH)
    return columns


def _hashed_rows(blocks: Sequence[Sequence[list[str]]]) -> HashedRows:
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    indptr = [0]
    for r in range(len(blocks[0])):
        nnz = 0
        for b, block in enumerate(blocks):
            columns = _hash_block(block[r])
            if len(columns):
                indices.append(columns + b * _N_HASH)
                data.append(np.full(len(columns), 1.0 / math.sqrt(len(columns)), np.float32))
                nnz += len(columns)
        indptr.append(indptr[-1] + nnz)
    return HashedRows(
        np.asarray(indptr, dtype=np.int64),
        np.concatenate(indices) if indices else np.zeros(0, np.int64),
        np.concatenate(data) if data else np.zeros(0, np.float32),
    )


def _wordpieces(texts: Sequence[str]) -> list[str]:
    global _TOKENIZER
    if _TOKENIZER is None:
        from trinity.agents.witness.embedding import _load_tokenizer

        _TOKENIZER = _load_tokenizer()  # its own, uncached
    encs = _TOKENIZER.encode_batch(list(texts), add_special_tokens=False)
    return [" ".join(e.tokens[:256]) for e in encs]


def _reference(texts: Sequence[str]) -> HashedRows:
    pieces = _wordpieces(texts)
    return _hashed_rows(
        (
            [_word_grams(_WORD_TOKENS.findall(t)) for t in texts],
            [_char_wb_grams(t) for t in texts],
            [_word_grams(_PIECE_TOKENS.findall(t)) for t in pieces],
        )
    )


# -- checks -----------------------------------------------------------------------------


def _assert_same(ours: HashedRows, ref: HashedRows) -> None:
    for name in ("indptr", "indices", "data"):
        mine, theirs = getattr(ours, name), getattr(ref, name)
        assert mine.dtype == theirs.dtype, name
        assert mine.shape == theirs.shape, name
        assert mine.tobytes() == theirs.tobytes(), name


def _check(texts: list[str]) -> None:
    """As one batch (twice: the second time from warm caches), then one text a call."""
    ref = _reference(texts)
    _assert_same(_sparse_features(texts), ref)
    _assert_same(_sparse_features(texts), ref)
    for text in texts:
        _assert_same(_sparse_features([text]), _reference([text]))


@pytest.fixture(autouse=True)
def _cold_caches() -> Iterator[None]:
    features._WORDS.clear()
    features._SEGMENTS.clear()
    yield
    features._WORDS.clear()
    features._SEGMENTS.clear()


# Pieces that stress the per-word and per-segment split: whitespace that str.split()
# and re's \s know but the BERT normaliser drops as control characters (\x0b, \x0c,
# \x1c-\x1f, \x85) or keeps as spaces, characters it removes (\x00, \ufffd, \u200b,
# \ufeff), combining marks after a space, final sigma, case mappings that grow,
# the tokenizer's special tokens, CJK (a piece per character), symbols (a token per
# character), and words longer than the caches keep.
_ODD_BITS = st.sampled_from(
    [" ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85",
     "\u00a0", "\u1680", "\u2028", "\u2029", "\u3000", "\u200b", "\ufeff", "\x00", "\ufffd",
     "\u0301", "e\u0301", "\u0323\u0301", "ΣΑΣ", "Σ", "σς", "İ", "ß", "ǅ", "ﬃ", "😀",
     "日本語", "한국어", "_", "-", "'", "!?", "..", "##", "[MASK]", "[UNK]", "[unk]",
     "[CLS]x", "xxbos", "0x1f", "a", "Z9", "ｆｕｌｌ", "ℌ𝔢", "x" * 33, "-" * 40,
     "supercalifragilisticexpialidocious_words", "é" * 31]
)
_TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",))),
    st.lists(_ODD_BITS, max_size=60).map("".join),
    st.lists(_ODD_BITS, min_size=200, max_size=400).map("".join),  # often > 256 pieces
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1500, max_size=4000),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXTS, max_size=6))
def test_equal_to_the_reference_on_any_text(texts: list[str]) -> None:
    _check(texts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXTS, max_size=6))
def test_equal_to_the_reference_while_the_caches_overflow(texts: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "_CACHE_CAP", 3)  # emptied every few words
        _check(texts)
        assert len(features._WORDS) <= 3 and len(features._SEGMENTS) <= 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXTS, max_size=4))
def test_equal_to_the_reference_tokenising_texts_whole(texts: list[str]) -> None:
    """The fallback for a tokenizer whose pieces a text's segments need not share."""
    features._tokenizer()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "_BY_SEGMENT", False)
        _check(texts)


def test_only_a_texts_first_256_pieces_count() -> None:
    texts = ["xxbos " * 150, "a " * 255 + "b c", "a " * 256 + "b c", "日本語" * 100]
    assert [len(p.split()) for p in _wordpieces(texts)] == [256, 256, 256, 256]
    _check(texts)


def test_the_segment_cache_is_used_by_this_tokenizer() -> None:
    features._tokenizer()
    assert features._BY_SEGMENT


def test_a_warm_call_tokenises_nothing() -> None:
    texts = ["xxbos fix flaky tests  in ci \u200b ok", "a b", ""]
    _sparse_features(texts)
    tokenizer = features._tokenizer()
    calls: list[Any] = []

    class Counting:
        def encode_batch(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return tokenizer.encode_batch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "_TOKENIZER", Counting())
        _assert_same(_sparse_features(texts), _reference(texts))
        _assert_same(_sparse_features(texts[:1]), _reference(texts[:1]))
    assert calls == []


def test_no_texts() -> None:
    _check([])
    _check(["", " ", "\x1f"])


def test_equal_to_the_reference_on_the_devset() -> None:
    texts = [normalise(event_text(event).text) for event, _, _ in load_devset()]
    ref = _reference(texts)
    for _ in range(2):  # cold, then warm
        _assert_same(_sparse_features(texts), ref)
        for start in range(0, len(texts), 200):
            batch = texts[start : start + 200]
            _assert_same(_sparse_features(batch), _reference(batch))
    singly = [_sparse_features([text]) for text in texts]
    for text, rows in zip(texts, singly, strict=True):
        _assert_same(rows, _reference([text]))
