"""The benchmarks' inputs are built from the project's current APIs (a benchmark runs
only in make targets and CI, so a broken import or shape would otherwise surface late)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from trinity.contract import PATTERNS as CATEGORIES

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    """A benchmark script as a module (its sibling ``report_rows`` importable, as when run)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_imports() -> None:
    for path in sorted(BENCHMARKS.glob("bench_*.py")):
        assert callable(_load(path.stem).main), path


def test_bench_llm_signals_are_one_scenario_event_per_category() -> None:
    signals = _load("bench_llm").signals()
    assert [s["pattern"] for s in signals] == list(CATEGORIES)
    assert [s["cycle"] for s in signals] == [1, 2, 3, 4, 5]
    assert all(s["message"].strip() for s in signals)


def test_bench_witness_stream_varies_details_not_the_event() -> None:
    """The stream's events recur with other details: numbers and ids change, fields other
    than the message are kept, and the same seed gives the same stream."""
    import random

    vary = _load("bench_witness_stream").vary
    event = {"message": "Job 4411 failed: commit 3fa9c1e2 timed out after 120 s",
             "severity": "error", "source": "ci"}
    varied = [vary(event, random.Random(i)) for i in range(50)]
    assert all(v["severity"] == "error" and v["source"] == "ci" for v in varied)
    assert len({v["message"] for v in varied}) > 40
    assert sum("3fa9c1e2" in v["message"] for v in varied) <= 1
    assert all("failed" in v["message"].lower() or "timed" in v["message"].lower()
               for v in varied)
    assert varied == [vary(event, random.Random(i)) for i in range(50)]
