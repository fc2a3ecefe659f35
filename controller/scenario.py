"""The test plan's five event categories, rotated one per event interval.

Each category carries the plan's example event; the category is the ground truth
the controller records beside the event (it is never sent to WITNESS).
"""

from __future__ import annotations

from typing import Any

CATEGORIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("critical_error", {
        "message": "Fatal error: NoneType in production payment processing",
        "severity": "critical", "file": "payments/stripe.py", "line": 142,
        "error_type": "AttributeError",
    }),
    ("constitution_violation", {
        "message": "Type safety violation: Dict[Any, Any] in user model",
        "file": "models/user.py", "line": 23, "severity": "high",
        "violation_type": "strict_typing", "keywords": ["type_safety", "constitution"],
    }),
    ("feature_request", {
        "message": "User requests dark mode toggle in settings",
        "source": "personal_context_stream", "priority": "NORMAL", "complexity": "medium",
    }),
    ("duplication", {
        "message": "Duplicate validation logic found in 3 files",
        "files": ["auth.py", "api.py", "utils.py"], "duplication_ratio": 0.85,
    }),
    ("flaky_test", {
        "message": "Test test_concurrent_transactions fails 40% of the time",
        "test_file": "tests/test_payments.py", "test_name": "test_concurrent_transactions",
        "failure_rate": "40%",
    }),
)


def event_for_cycle(cycle: int) -> tuple[str, dict[str, Any]]:
    """The ground-truth category and the event fields for a 1-based cycle."""
    category, fields = CATEGORIES[(cycle - 1) % len(CATEGORIES)]
    return category, dict(fields)
