"""Corrections: a person's label for an event decides the next event with the same or a
nearly identical text, after a restart too; the store counts them per pattern; a file of
corrections reports each line it cannot apply, with the reason, and applies the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trinity.agents.witness.corrections import DEAD_LETTER_CONSUMER
from trinity.agents.witness.knowledge import Knowledge
from trinity.cli import main
from trinity.contract import NONE
from trinity.db import reading
from trinity.settings import Settings
from trinity.stores import journal as journal_store

# A maintenance change that mentions duplicates (a hard negative), and variants of it:
# the same text with other numbers and names, and one with a word changed.
TEXT = "Remove duplicate entry for release 2.3.1 from CHANGELOG.md"
SAME_MASKED = "Remove duplicate entry for release 4.0.17 from NEWS.md"
ONE_WORD = "Remove duplicate entry for release 2.3.1 from the CHANGELOG.md"
UNRELATED = "panic: runtime error: invalid memory address or nil pointer dereference"


def _settings(root: Path) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(root)})


def _decision(knowledge: Knowledge, event_id: str, text: str) -> str:
    observed = knowledge.observe({"message": text}, event_id=event_id)
    return observed.pattern or NONE


def test_a_correction_decides_the_same_and_nearly_identical_texts_across_a_restart(
        short_dir: Path) -> None:
    knowledge = Knowledge.open(_settings(short_dir))
    try:
        first = _decision(knowledge, "e1", TEXT)
        unrelated_before = _decision(knowledge, "u1", UNRELATED)
        # The person's label differs from the model's, whatever the model said.
        label = NONE if first != NONE else "feature_request"
        correction = knowledge.store.correct("e1", label, source="test")
        assert (correction.event_id, correction.label, correction.was) == ("e1", label, first)
        assert _decision(knowledge, "e2", TEXT) == label
        assert _decision(knowledge, "e3", SAME_MASKED) == label
        assert _decision(knowledge, "e4", ONE_WORD) == label
        assert _decision(knowledge, "u2", UNRELATED) == unrelated_before
        # What WITNESS learned from e1 now carries the person's label.
        if first != NONE:
            assert correction.relabelled_id is not None
            assert knowledge.store.conn.execute(
                "SELECT label FROM exemplars WHERE event_id='e1'").fetchone()[0] == label
    finally:
        knowledge.close()
    knowledge = Knowledge.open(_settings(short_dir))  # a restart
    try:
        assert _decision(knowledge, "e5", TEXT) == label
        assert _decision(knowledge, "e6", ONE_WORD) == label
        counts = knowledge.store.correction_counts()
    finally:
        knowledge.close()
    assert counts[label]["to"] == 1
    assert counts[first]["from"] == 1


def test_a_running_store_takes_corrections_another_process_recorded(short_dir: Path) -> None:
    """WITNESS keeps its store open while ``trinity witness correct`` opens another."""
    running = Knowledge.open(_settings(short_dir))
    try:
        first = _decision(running, "e1", TEXT)
        label = NONE if first != NONE else "duplication"
        result = CliRunner().invoke(main, ["witness", "correct", "e1", label],
                                    env={"TRINITY_DATA_DIR": str(short_dir)},
                                    prog_name="trinity", catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert f"event e1: was {first}, now {label}" in result.output
        assert running.store.refresh_corrections()
        assert not running.store.refresh_corrections()  # nothing new since
        assert _decision(running, "e2", ONE_WORD) == label
        assert running.store.index.ntotal == running.store.exemplar_count()
    finally:
        running.close()


def test_a_second_correction_of_a_text_replaces_the_first(short_dir: Path) -> None:
    knowledge = Knowledge.open(_settings(short_dir))
    try:
        _decision(knowledge, "e1", TEXT)
        one = knowledge.store.correct("e1", "duplication")
        two = knowledge.store.correct("e1", NONE)
        assert two.id == one.id and two.exemplar_id == one.exemplar_id
        assert _decision(knowledge, "e2", TEXT) == NONE
        assert knowledge.store.correction_counts()[NONE]["to"] == 1
        assert "duplication" not in knowledge.store.correction_counts() or \
            knowledge.store.correction_counts()["duplication"]["to"] == 0
    finally:
        knowledge.close()


def test_a_file_of_corrections_applies_good_lines_and_names_each_bad_one(
        short_dir: Path, tmp_path: Path) -> None:
    knowledge = Knowledge.open(_settings(short_dir))
    try:
        _decision(knowledge, "e1", TEXT)
    finally:
        knowledge.close()
    lines = [
        json.dumps({"event_id": "e1", "label": NONE}),
        "not json at all",
        json.dumps(["e1", NONE]),
        json.dumps({"event_id": "e1"}),
        json.dumps({"event_id": 7, "label": NONE}),
        json.dumps({"event_id": "e1", "label": "typo"}),
        json.dumps({"event_id": "never-seen", "label": NONE}),
        "",
        json.dumps({"event_id": "mail-1", "label": "feature_request",
                    "message": "Please add an option to export the board as CSV"}),
        "\x00\x01 binary \udcff",
    ]
    path = tmp_path / "corrections.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    result = CliRunner().invoke(main, ["witness", "correct", "--file", str(path)],
                                env={"TRINITY_DATA_DIR": str(short_dir)},
                                prog_name="trinity", catch_exceptions=False)
    assert result.exit_code == 1
    out = result.output
    assert "line 1: was " in out and "now none" in out
    assert "line 2: not applied: not JSON" in out
    assert "line 3: not applied: a line must be a JSON object, not list" in out
    assert "line 4: not applied: 'label' is missing" in out
    assert "line 5: not applied: 'event_id' must be a string" in out
    assert "line 6: not applied: unknown label 'typo'" in out
    assert ("line 7: not applied: event 'never-seen' was never classified here: give its "
            "text (--message)") in out
    assert "line 9: never decided here, now feature_request" in out
    assert "line 10: not applied: not JSON" in out
    assert "2 of 9 corrections applied (reasons and raw lines: trinity dead-letters)" in out
    # Each line not applied is dead-lettered with its reason and the line as given.
    with reading(short_dir / "trinity_messages.db") as conn:
        letters = journal_store.dead_letters(conn, DEAD_LETTER_CONSUMER)
    assert sorted(d.reason.split(":")[0] for d in letters) == [
        f"line {n}" for n in (10, 2, 3, 4, 5, 6, 7)]
    raws = {d.reason.split(":")[0]: d.raw for d in letters}
    assert raws["line 2"] == b"not json at all"
    assert raws["line 10"] == "\x00\x01 binary \udcff".encode("utf-8", "surrogateescape")
    assert raws["line 6"] == lines[5].encode()


@pytest.mark.parametrize("args", [[], ["e1"], ["e1", NONE, "--file", "-"]])
def test_the_command_asks_for_an_event_and_a_label_or_a_file(
        short_dir: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["witness", "correct", *args],
                                env={"TRINITY_DATA_DIR": str(short_dir)}, prog_name="trinity")
    assert result.exit_code == 2
    assert "give EVENT_ID LABEL, or --file" in result.output or "--file takes no" in result.output


def test_the_counts_dashboards_and_reports_show(short_dir: Path) -> None:
    """The pattern snapshot, dashboard and report show the store's counts through
    ``measures``: the total and, per label, corrections to it and from it."""
    from trinity import measures

    knowledge = Knowledge.open(_settings(short_dir))
    try:
        _decision(knowledge, "e1", TEXT)
        _decision(knowledge, "e2", UNRELATED)
        knowledge.store.correct("e1", "duplication")
        knowledge.store.correct("e2", NONE)
        knowledge.store.correct(None, "feature_request", "Please add a CSV export")
        counts = knowledge.store.correction_counts()
    finally:
        knowledge.close()
    summary = measures.corrections_summary(counts)
    assert summary["total"] == 3
    assert {label: c["to"] for label, c in summary["by_label"].items() if c["to"]} == {
        "duplication": 1, NONE: 1, "feature_request": 1}
    assert sum(c["from"] for c in summary["by_label"].values()) == 2  # the third was new
    line = measures.corrections_line(summary)
    assert line.startswith("3 (") and "feature_request: 1 to it" in line
    assert measures.corrections_line(measures.corrections_summary({})) == "0"
