"""Benchmark suite (``make bench``): every benchmark, then one table of their figures.

    python benchmarks/bench_all.py               # bus, pipeline, witness, witness_stream, llm, 24h
    python benchmarks/bench_all.py bus pipeline  # only these
    BENCH_SHORT=1 python benchmarks/bench_all.py # each in its short form

Each benchmark runs as its own process, one after another (their output passes
through), and writes ``reports/bench_<name>.json`` with its figures as ``rows``
(``benchmarks/report_rows.py``). This reads the report each wrote *in this run* and
prints one table: figure, value, the reference measured in the same run, ratio, target,
met. A benchmark without a usable report from this run (it crashed or timed out before
writing one, or wrote rows of another shape), or one that exited non-zero although its
rows show no missed target, is a failure row. Saves ``reports/bench_YYYYMMDD.md`` and
``reports/bench_YYYYMMDD.json``; exits 1 if any target was missed or any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from report_rows import COLUMNS, cells, format_table, problem

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
BENCHMARKS = ("bus", "pipeline", "witness", "witness_stream", "llm", "24h")
# Generous bounds on each benchmark's full form (measured: bus ~1 min, pipeline ~5 min,
# witness ~4 min, llm ~6 min, 24h ~2.5 min on 2 shared cores).
TIMEOUT_S = {"bus": 900, "pipeline": 1800, "witness": 2400, "llm": 3600, "24h": 2400}


@dataclass
class Outcome:
    """One benchmark's run: how it exited and the report it wrote in this run."""

    name: str
    exit_code: int | None  # None: killed at its timeout
    seconds: float
    report: dict[str, Any] | None
    error: str | None = None  # why there is no usable report


def run_benchmark(name: str) -> Outcome:
    """Run ``benchmarks/bench_<name>.py``; its report counts only if written meanwhile."""
    script = Path(__file__).resolve().parent / f"bench_{name}.py"
    path = REPORTS / f"bench_{name}.json"
    print(f"\n=== bench_{name} ===", flush=True)
    started_ns, started = time.time_ns(), time.monotonic()
    try:
        code: int | None = subprocess.run([sys.executable, str(script)], cwd=ROOT,
                                          timeout=TIMEOUT_S[name]).returncode
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - started
    if not path.exists() or path.stat().st_mtime_ns < started_ns:
        how = (f"timed out after {TIMEOUT_S[name]} s" if code is None else f"exited {code}")
        return Outcome(name, code, seconds, None, f"{how} without writing {path.name}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Outcome(name, code, seconds, None, f"{path.name} is not readable JSON: {exc}")
    return Outcome(name, code, seconds, report)


def _failure(name: str, why: str) -> dict[str, Any]:
    return {"benchmark": name, "name": f"{name}: benchmark failed", "value": None, "unit": "",
            "reference": None, "ratio": None, "target": "a complete report from this run",
            "met": False, "error": why}


def table_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Every benchmark's rows, each tagged with its benchmark, and a failure row for a
    benchmark without usable rows or with an exit status its rows do not explain."""
    rows: list[dict[str, Any]] = []
    for out in outcomes:
        if out.report is None:
            rows.append(_failure(out.name, out.error or "no report"))
            continue
        found = out.report.get("rows")
        if not isinstance(found, list) or not found:
            rows.append(_failure(out.name, "its report has no rows"))
            continue
        why = next(filter(None, map(problem, found)), None)
        if why is not None:
            rows.append(_failure(out.name, why))
            continue
        rows += [{"benchmark": out.name, **row} for row in found]
        if out.exit_code != 0 and all(row["met"] is not False for row in found):
            how = "timed out" if out.exit_code is None else f"exited {out.exit_code}"
            rows.append(_failure(out.name, f"{how} although no target in its report was "
                                           "missed"))
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    head = [f"# Benchmarks {meta['date']}", "",
            f"{'Short' if meta['short'] else 'Full'} form (BENCH_SHORT="
            f"{'1' if meta['short'] else 'unset'}), {meta['cpus']} CPUs, load average "
            f"{meta['load_before']} before and {meta['load_after']} after; "
            + ", ".join(f"{b['name']} {b['seconds']:.0f} s (exit {b['exit_code']})"
                        for b in meta["benchmarks"]) + ".", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(escape(c) for c in cells(row)) + " |" for row in rows]
    missed = [row["name"] for row in rows if row["met"] is False]
    tail = ["", f"Missed: {', '.join(missed)}." if missed else "Every target met."]
    return "\n".join(head + body + tail) + "\n"


def save(rows: list[dict[str, Any]], meta: dict[str, Any], reports: Path) -> list[Path]:
    stamp = meta["date"].replace("-", "")
    md, js = reports / f"bench_{stamp}.md", reports / f"bench_{stamp}.json"
    reports.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(rows, meta), encoding="utf-8")
    js.write_text(json.dumps({**meta, "rows": rows,
                              "all_met": all(r["met"] is not False for r in rows)},
                             indent=2) + "\n", encoding="utf-8")
    return [md, js]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if n in args.names] or list(BENCHMARKS)
    short = os.environ.get("BENCH_SHORT", "") not in ("", "0")
    load_before = round(os.getloadavg()[0], 2)
    date = datetime.now().strftime("%Y-%m-%d")
    outcomes = [run_benchmark(name) for name in names]
    rows = table_rows(outcomes)
    meta = {"date": date, "short": short, "cpus": os.cpu_count(), "load_before": load_before,
            "load_after": round(os.getloadavg()[0], 2),
            "benchmarks": [{"name": o.name, "exit_code": o.exit_code,
                            "seconds": round(o.seconds, 1), "error": o.error}
                           for o in outcomes]}
    print("\n" + format_table(rows))
    written = save(rows, meta, REPORTS)
    print("\nwrote " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0 if all(r["met"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
