"""The plan's anomaly rules, each evaluated on measured data by the controller (the
limits are the plan's, ``trinity.plan``).

Every rule fires when its condition starts and re-arms only once it has cleared, so a
condition that lasts is one alert, not one per sample. Alert ids are derived from the
run, the subject and the simulated hour: a controller restarted in the middle of a
condition raises the same id again, and the alert log keeps it once.
"""

from __future__ import annotations

from typing import Any

from trinity.contract import WITNESS, Alert
from trinity.plan import (
    BACKLOG_LIMIT,
    COST_SPIKE_USD_PER_HOUR,
    DETECTION_RATE_MIN,
    MEMORY_GROWTH_PCT_PER_HOUR,
    MEMORY_LIMIT_MB,
)

DETECTION_MIN_EVENTS = 5         # pattern events classified before the rate means anything


class Rules:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._active: set[str] = set()  # conditions currently true (already alerted)

    def _edge(self, subject: str, condition: bool) -> bool:
        """True when ``condition`` just became true for ``subject``."""
        if not condition:
            self._active.discard(subject)
            return False
        if subject in self._active:
            return False
        self._active.add(subject)
        return True

    def _id(self, kind: str, subject: str, sim_s: float) -> str:
        return f"{kind}/{self.run_id}/{subject}/h{int(sim_s // 3600):03d}"

    def backlog(self, backlogs: dict[str, int], sim_s: float) -> list[Alert]:
        alerts = []
        for queue, pending in sorted(backlogs.items()):
            if self._edge(f"backlog:{queue}", pending > BACKLOG_LIMIT):
                alerts.append(Alert(
                    "queue_backlog", "warning",
                    f"queue {queue} has {pending} pending messages (limit {BACKLOG_LIMIT})",
                    self._id("backlog", queue, sim_s),
                    details={"queue": queue, "pending": pending, "limit": BACKLOG_LIMIT}))
        return alerts

    def memory(self, rss_mb: dict[str, float], growth_pct: dict[str, float],
               sim_s: float) -> list[Alert]:
        alerts = []
        for name, mb in sorted(rss_mb.items()):
            if self._edge(f"memory_limit:{name}", mb > MEMORY_LIMIT_MB):
                alerts.append(Alert(
                    "memory_limit", "error",
                    f"{name} uses {mb:.0f} MB RSS (limit {MEMORY_LIMIT_MB:.0f} MB)",
                    self._id("memory_limit", name, sim_s), agent=name,
                    details={"rss_mb": mb, "limit_mb": MEMORY_LIMIT_MB}))
        for name, pct in sorted(growth_pct.items()):
            if self._edge(f"memory_growth:{name}", pct > MEMORY_GROWTH_PCT_PER_HOUR):
                alerts.append(Alert(
                    "memory_leak", "warning",
                    f"{name} memory grew {pct:.1f}% per simulated hour "
                    f"(limit {MEMORY_GROWTH_PCT_PER_HOUR:.0f}%)",
                    self._id("memory_growth", name, sim_s), agent=name,
                    details={"growth_pct_per_hour": round(pct, 2),
                             "limit_pct": MEMORY_GROWTH_PCT_PER_HOUR}))
        return alerts

    def detection(self, scores: dict[str, Any], sim_s: float) -> list[Alert]:
        rate, n = scores.get("detection_rate"), scores.get("pattern_events_classified", 0)
        low = rate is not None and n >= DETECTION_MIN_EVENTS and rate < DETECTION_RATE_MIN
        if not self._edge("detection", low):
            return []
        return [Alert(
            "detection_failure", "error",
            f"WITNESS detected {scores['detected']} of {n} pattern events "
            f"({rate:.0%}, minimum {DETECTION_RATE_MIN:.0%})",
            self._id("detection", WITNESS, sim_s), agent=WITNESS,
            details={"detection_rate": rate, "classified": n, "detected": scores["detected"],
                     "minimum": DETECTION_RATE_MIN})]

    def cost_spike(self, spent_last_hour_usd: float, sim_s: float) -> list[Alert]:
        if not self._edge("cost", spent_last_hour_usd > COST_SPIKE_USD_PER_HOUR):
            return []
        return [Alert(
            "cost_spike", "warning",
            f"${spent_last_hour_usd:.2f} spent on model calls in the last simulated hour "
            f"(limit ${COST_SPIKE_USD_PER_HOUR:.2f})",
            self._id("cost_spike", "run", sim_s),
            details={"spent_last_hour_usd": round(spent_last_hour_usd, 6),
                     "limit_usd": COST_SPIKE_USD_PER_HOUR})]
