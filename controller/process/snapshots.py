"""What the controller's snapshot files hold, each computed from recorded data at the
moment it is written: the header every snapshot carries and the cost snapshot's body
(the pattern snapshot's is ``trinity.measures.pattern_stats``, the metrics one the
sampler's). Where the files go is the run log folder's (``trinity.stores.run_logs``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from trinity.contract import AGENTS


def header(run_id: str, scheduled_sim_s: float, sampled_sim_s: float) -> dict[str, Any]:
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "elapsed_hours": round(scheduled_sim_s / 3600, 4),
        "run_id": run_id,
        "sampled_sim_elapsed_s": round(sampled_sim_s, 1),
    }


def cost_snapshot(totals: dict[str, Any], spent_last_hour_usd: float,
                  budget_usd: float) -> dict[str, Any]:
    """The plan's summary (total, calls, success rate, cost by agent) and the detail."""
    by_agent = {name.upper(): round(totals["by_agent"].get(name, {}).get("cost_usd", 0.0), 6)
                for name in AGENTS}
    return {
        "summary": {
            "total_cost_usd": totals["total_cost_usd"],
            "total_calls": totals["total_calls"],
            "success_rate": totals["success_rate"],
            "by_agent": by_agent,
        },
        "budget_usd": budget_usd,
        "budget_used_pct": round(totals["total_cost_usd"] / budget_usd * 100, 3)
        if budget_usd else None,
        "cost_last_hour_usd": round(spent_last_hour_usd, 6),
        "requests": totals["requests"],
        "by_status": totals["by_status"],
        "by_route": totals["by_route"],
        "local_share_calls": totals["local_share_calls"],
        "local_share_tokens": totals["local_share_tokens"],
        "input_tokens": totals["input_tokens"],
        "output_tokens": totals["output_tokens"],
        "calls_by_agent": {k: v["calls"] for k, v in totals["by_agent"].items()},
        "by_model": totals["by_model"],
        "by_provider": totals["by_provider"],
    }
