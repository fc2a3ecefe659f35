"""The path mask against the pattern it replaced.

``text._PATH`` forbids a match from starting inside a run of path characters (except at
a drive, "C:"), so the search no longer rescans each word from every position in it.
Its matches must be the old pattern's exactly: on any text of path-like characters, and
on the dev set, where ``normalise`` must give the same text as with the old pattern.
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
