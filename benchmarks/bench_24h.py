"""Benchmark: the compressed 24-hour run at the demo's speed, in a fresh project folder.

    python benchmarks/bench_24h.py        # 24 simulated hours (BENCH_SHORT=1: 6 hours)

Measures, from the run's own records:
- wall time of ``trinity run`` (start of supervisord to the end of the run and the
  stop), against the ideal ``duration / time scale`` measured on the same clock;
- peak total memory over every metrics sample: the sum of the processes' PSS (the
  model's mapped pages counted once) and, for reference, the sum of their RSS;
- memory growth per simulated hour after warm-up (a process is warm once it has done
  its first piece of work): the total's and each process's, from the last sample.

Targets: wall <= 5 minutes (full run), peak total <= 330 MB, growth <= 1 % per
simulated hour. The plan allows 400 MB; the model server (one copy of the model and
its context for both model agents) and lean model agents and WITNESS (no pydantic, no
asyncio, no tokenizer cache of whole texts) bring the run's peak to ~313 MB, so 330 MB
leaves room for another machine's libraries and still catches a regression.
Prints a table, writes ``reports/bench_24h.json``, exits 1 when a target is missed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report_rows import figure, write_report

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "bench_24h.json"
BIN = Path(sys.executable).parent
TIME_SCALE = 2880.0  # the Makefile's DEMO_TIME_SCALE
WALL_TARGET_S = 300.0
PEAK_TARGET_MB = 330.0
GROWTH_TARGET_PCT = 1.0


def _samples(log_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted((log_dir / "metrics").glob("system_metrics_*.json")):
        found.append(json.loads(path.read_text(encoding="utf-8")))
    return found


def _process_growth(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Per process, its RSS growth per simulated hour in the last sample (measured by the
    controller from the process's first sample after its first piece of work)."""
    return {name: proc["growth_pct_per_hour"] for name, proc in samples[-1]["processes"].items()
            if proc.get("growth_pct_per_hour") is not None}


def main() -> int:
    short = os.environ.get("BENCH_SHORT", "") not in ("", "0")
    duration_h = float(os.environ.get("BENCH_DURATION_H") or (6 if short else 24))
    folder = Path(tempfile.mkdtemp(prefix="b24", dir="/tmp"))
    shutil.copy(ROOT / "supervisor.conf", folder / "supervisor.conf")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "TRINITY_DATA_DIR": str(folder)})
    print(f"bench-24h: {duration_h:g} simulated hours at time scale {TIME_SCALE:g} "
          f"(ideal {duration_h * 3600 / TIME_SCALE:.1f} s), project in {folder}", flush=True)
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "trinity"), "run", "--duration", str(duration_h),
             "--time-scale", str(TIME_SCALE)],
            cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
            print(f"the run failed (exit {proc.returncode})")
            return 1
        samples = _samples(folder / "logs" / "24h_test")
    finally:
        subprocess.run([str(BIN / "trinity"), "stop"], cwd=folder, env=env,
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
    if not samples:
        print("no metrics samples were written")
        return 1
    ideal = duration_h * 3600 / TIME_SCALE
    at_peak = max(samples, key=lambda s: s["memory_mb"])
    peak_pss = at_peak["memory_mb"]
    # What each process held at that moment (PSS, MB): where a memory target is missed.
    peak_split = {name: proc["pss_mb"] for name, proc in at_peak["processes"].items()}
    peak_rss = max(s["memory_rss_total_mb"] for s in samples)
    peak_process = max(s["memory_max_process_rss_mb"] for s in samples)
    total_growth = samples[-1].get("memory_growth_pct_per_hour")
    growth = _process_growth(samples)
    worst = max([g for g in (total_growth, *growth.values()) if g is not None], default=None)
    wall_target = WALL_TARGET_S * duration_h / 24
    checks = [
        ("wall time", f"{wall:.1f} s ({wall / ideal:.1f}x ideal {ideal:.1f} s)",
         f"<= {wall_target:.0f} s", wall <= wall_target),
        ("peak total memory (PSS)", f"{peak_pss:.0f} MB (RSS sum {peak_rss:.0f} MB, "
         f"largest process {peak_process:.0f} MB)", f"<= {PEAK_TARGET_MB:.0f} MB",
         peak_pss <= PEAK_TARGET_MB),
        ("memory growth per sim hour", "-" if worst is None else
         f"{worst:+.2f}% worst (total {total_growth}, per process {growth})",
         f"<= {GROWTH_TARGET_PCT:g}%", worst is not None and worst <= GROWTH_TARGET_PCT),
    ]
    print(f"\n{len(samples)} metrics samples; at the peak, PSS by process: "
          + ", ".join(f"{name} {mb:.0f} MB" for name, mb in sorted(peak_split.items())))
    for name, measured, target, ok in checks:
        print(f"  {'OK    ' if ok else 'MISSED'} {name:<28} {measured}  (target {target})")
    rows = [
        figure("24h: wall time of the compressed run", round(wall, 2), "s",
               reference=("ideal: duration / time scale", round(ideal, 2), "s"),
               target=f"<= {wall_target:.0f} s", met=checks[0][3]),
        figure("24h: peak total memory (PSS)", peak_pss, "MB",
               target=f"<= {PEAK_TARGET_MB:.0f} MB", met=checks[1][3]),
        figure("24h: memory growth per simulated hour, worst process or total", worst, "%",
               target=f"<= {GROWTH_TARGET_PCT:g} %", met=checks[2][3]),
    ]
    write_report(REPORT, {
        "duration_h": duration_h, "time_scale": TIME_SCALE, "wall_s": round(wall, 2),
        "ideal_s": round(ideal, 2), "samples": len(samples), "peak_total_pss_mb": peak_pss,
        "peak_pss_by_process_mb": peak_split,
        "peak_total_rss_mb": peak_rss, "peak_process_rss_mb": peak_process,
        "total_growth_pct_per_hour": total_growth, "process_growth_pct_per_hour": growth,
        "targets_met": all(ok for *_, ok in checks),
    }, rows)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
