"""``normalise``'s shortcuts against the plain computation.

``text._PATH`` forbids a match from starting inside a run of path characters (except at
a drive, "C:"), so the search no longer rescans each word from every position in it.
Its matches must be the old pattern's exactly: on any text of path-like characters, and
on the dev set, where ``normalise`` must give the same text as with the old pattern.
And a pattern is skipped on a text that lacks what any match holds ("http", ":", "0x",
a quote, a slash, ".", an upper-case letter): ``normalise`` must equal every pattern
applied to every text.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.agents.witness import text
from trinity.agents.witness.dataset import load_devset
from trinity.agents.witness.text import event_text, normalise

OLD_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\w.@~+-]*[/\\])+[\w.@+-]*")
# every character class the pattern tells apart: letters (drive or not), digits, the
# path punctuation, '~' (a path character the last segment does not take), slashes,
# ':' and what ends a path
ALPHABET = "aCz9_.@~+-/\\: \n'é"


def spans(pattern: re.Pattern[str], value: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(value)]


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_the_same_matches_as_the_old_pattern_on_any_text(value: str) -> None:
    assert spans(text._PATH, value) == spans(OLD_PATH, value)


def test_the_cases_that_tell_the_patterns_apart() -> None:
    """A drive inside a word ("xC:/a"), a match ending before '~', a path after one."""
    for value in ("xC:/a", "ab/c~d", "a/b~c/d", "~/x", "C:\\Users\\a", "x.y@z/w q/r",
                  "see src/app.py:12 and lib/x", "1a:/b"):
        assert spans(text._PATH, value) == spans(OLD_PATH, value), value


def test_normalise_is_unchanged_on_the_devset(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [event_text(event).text for event, _, _ in load_devset()]
    new = [normalise(t) for t in texts]
    monkeypatch.setattr(text, "_PATH", OLD_PATH)
    assert [normalise(t) for t in texts] == new


def _plain_normalise(value: str) -> str:
    """``normalise`` as it was: every pattern on every text, the old path pattern."""
    value = value[: text.MAX_FEATURE_CHARS]
    value = "xxbos " + value.replace("\n", " xxbos ")
    for pattern, repl, _ in text._MASKS:
        value = pattern.sub(repl, value)
    value = text._QUOTED.sub(text._mask_keep_test("quoted"), value)
    value = OLD_PATH.sub(text._mask_keep_test("path"), value)
    value = text._FILENAME.sub(text._mask_keep_test("filename"), value)
    value = text._CAMEL.sub(" ", value)
    value = value.replace("_", " ")
    value = text._NUMBER.sub("0", value)
    return text._WS.sub(" ", value).strip().lower()


# what the masks look for, and what they must not be fooled by
_PIECES = st.sampled_from([
    "http://a.b/c", "https://x", "www.y.z", "http", "www", "2026-12-07T10:11:12Z",
    "10:11:12.5", "1:2", ":", "0x1F", "0xg", "deadbeef1", "'q'", '"Test x"', "`t`", "'",
    "src/a.py", "a\\b", "C:/x", "file.py:", "a.b", "camelCase", "HTTPServer", "ÉTÉ", "é",
    "_", "12,5", " ", "\n", "  ", "test"])


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.lists(_PIECES, max_size=12).map("".join),
                 st.lists(_PIECES, max_size=12).map(" ".join), st.text(max_size=60)))
def test_normalise_equals_every_pattern_on_every_text(value: str) -> None:
    assert normalise(value) == _plain_normalise(value)


def test_normalise_equals_every_pattern_on_the_devset() -> None:
    texts = [event_text(event).text for event, _, _ in load_devset()]
    assert [normalise(t) for t in texts] == [_plain_normalise(t) for t in texts]
