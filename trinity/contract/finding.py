"""The one shape of a ``trinity doctor`` check's result.

The checks are split by layer, as the code they check is: the model calls' in
``trinity.agents.models.doctor``, the rest in ``trinity.controller.ops.doctor``. The two
may not import each other, so what they both return is spelled here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PASS = "PASS"
# Works, but not as the plan assumes (an earlier run's stores, a key not set): the run
# can start; the line says what to do to match the plan.
WARN = "WARN"
# The run would fail or not start: ``make start-24h`` stops here.
FAIL = "FAIL"
STATUSES = (PASS, WARN, FAIL)


@dataclass(frozen=True)
class Finding:
    """One check: its name (stable, for ``--json`` and ``--skip``), what it found, and
    for a WARN or FAIL what to do about it."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def passed(name: str, detail: str) -> Finding:
    return Finding(name, PASS, detail)


def warned(name: str, detail: str, fix: str) -> Finding:
    return Finding(name, WARN, detail, fix)


def failed(name: str, detail: str, fix: str) -> Finding:
    return Finding(name, FAIL, detail, fix)
