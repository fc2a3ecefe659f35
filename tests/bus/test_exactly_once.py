"""The exactly-once checker the bus's kill -9 acceptance test relies on
(tests/system/test_exactly_once.py): each kind of damage is reported."""

from __future__ import annotations

from tests.bus._common import ALPHA, BETA, exactly_once_problems


def test_exactly_once_checker_catches_duplicates_gaps_and_reordering() -> None:
    """The acceptance assertions can fail: each kind of damage is reported."""
    good = [(s, i + 1, f"{s}/{i}", i) for i in range(10) for s in (ALPHA, BETA)]
    expect = {ALPHA: 10, BETA: 10}
    assert exactly_once_problems(good, expect) == []
    duplicated = [*good, good[3]]
    assert any("duplicate seq" in p for p in exactly_once_problems(duplicated, expect))
    lost = good[:-1]
    assert any("missing" in p for p in exactly_once_problems(lost, expect))
    swapped = list(good)
    swapped[0], swapped[2] = swapped[2], swapped[0]  # alpha seq 2 applied before seq 1
    assert any("strictly increasing" in p for p in exactly_once_problems(swapped, expect))
