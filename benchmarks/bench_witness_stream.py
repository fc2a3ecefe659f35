"""Benchmark: WITNESS learning from a long stream of events, memory and latency bounded.

    python benchmarks/bench_witness_stream.py   # 1,000,000 events (BENCH_SHORT=1: 50,000;
                                                # BENCH_N=... to choose)

What WITNESS does with each event, in this process: the pattern store (a fresh SQLite
file and its index, seeded with the shipped dev set), the trained detector, and
``Knowledge.observe_many`` with learning on, in batches of ``PREPARE_CHUNK`` events (the
most the WITNESS process classifies at once). The events are the dev set's, drawn at
random and varied the way a recurring event varies in the wild: other numbers, ids,
hashes and durations, a timestamp or host prefix, a word dropped or repeated, a clause
added, another case. Every detection is recorded (1M rows in the store's file); a near
copy of a known exemplar strengthens it, anything else is added, up to the store's cap.

Printed every tenth of the run (the growth curve): events so far, exemplars, exemplars
added in that tenth, process RSS, CPU ms per event. At the end, single events (a batch
of one, learning on) are timed over the dev set in three rounds: the quietest round's
p99 is what a quiet WITNESS answers in (the others add the host's interference; all
three are printed). The embedding tables' mapped pages are given back every
``Witness.RELEASE_PAGES_EVERY_S``, as the WITNESS process does. Reference, measured in
the same run: the same single-event p99 on the freshly seeded store before the stream.
Targets: RSS <= 400 MB and single-event p99 <= 5 ms at the end. Exits 1 when a target
is missed; writes reports/bench_witness_stream.json.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report_rows import figure, format_table, write_report

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "bench_witness_stream.json"
TARGET_RSS_MB = 400.0
TARGET_P99_MS = 5.0
CURVE_POINTS = 10

_NUMBER = re.compile(r"\d+")
_HEX = re.compile(r"\b[0-9a-f]{7,40}\b")
_PREFIXES = ("{ts} ", "[{ts}] ", "{host}: ", "{ts} {host} ", "")
_SUFFIXES = (" (attempt {n})", " on {host}", " in {n} ms", " - build #{n}", " again", "")


def vary(event: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``event`` as it might recur: same meaning, other details."""
    message = str(event.get("message", ""))
    message = _HEX.sub(lambda m: "".join(rng.choice("0123456789abcdef")
                                         for _ in m.group()), message)
    message = _NUMBER.sub(lambda m: str(rng.randint(0, 10 ** min(len(m.group()), 6))),
                          message)
    words = message.split(" ")
    if len(words) > 4 and rng.random() < 0.3:
        del words[rng.randrange(len(words))]
    if len(words) > 2 and rng.random() < 0.1:
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    message = " ".join(words)
    if rng.random() < 0.1:
        message = message.lower() if rng.random() < 0.5 else message.upper()
    fill = {"ts": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                  f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            "host": f"{rng.choice(('web', 'worker', 'ci', 'db'))}-{rng.randint(1, 99)}",
            "n": rng.randint(1, 9999)}
    message = (rng.choice(_PREFIXES).format(**fill) + message
               + rng.choice(_SUFFIXES).format(**fill))
    return {**event, "message": message}


# Rounds of single events; the figure is the round with the lowest p99 (timeit's rule, as
# in bench_witness: every event's cost, the slowest ones' included, is in each round).
ROUNDS = 3


def single_p99(knowledge: Any, events: list[dict[str, Any]], tag: str) -> list[float]:
    """The single-event p99 (ms) of each round over ``events``, learning on: each round
    under new event ids, so none is answered as "recorded before"."""
    p99s = []
    for r in range(ROUNDS):
        latencies = []
        for i, event in enumerate(events):
            started = time.perf_counter()
            knowledge.observe(event, event_id=f"{tag}{r}-{i}")
            latencies.append((time.perf_counter() - started) * 1000)
        p99s.append(float(statistics.quantiles(latencies, n=100, method="inclusive")[98]))
    return p99s


def main() -> int:
    import psutil

    from trinity.agents.witness.dataset import load_devset
    from trinity.agents.witness.embedding import load_embedder
    from trinity.agents.witness.knowledge import Knowledge, load_model
    from trinity.agents.witness.process import Witness
    from trinity.agents.witness.store import PatternStore
    from trinity.agents.witness.text import event_text
    from trinity.bus.node import PREPARE_CHUNK

    n_events = int(os.environ.get("BENCH_N") or (50_000 if os.environ.get("BENCH_SHORT")
                                                 else 1_000_000))
    proc = psutil.Process()
    embedder = load_embedder()
    devset = load_devset()
    events = [event for event, _, _ in devset]
    rng = random.Random(20261207)
    with tempfile.TemporaryDirectory() as tmp:
        store = PatternStore(Path(tmp) / "trinity_patterns.db", embedder)
        store.seed([(event_text(e).text, label, origin) for e, label, origin in devset])
        knowledge = Knowledge(embedder, store, load_model(embedder, train_apart=True))
        seeded = store.exemplar_count()
        probe = [vary(e, random.Random(i)) for i, e in enumerate(events)]
        rounds_before = single_p99(knowledge, probe, "before")
        p99_before = min(rounds_before)
        print(f"bench-witness-stream: {n_events:,} events, batches of {PREPARE_CHUNK}, "
              f"{os.cpu_count()} CPUs; store seeded with {seeded:,} exemplars, "
              f"{store.exemplar_count():,} after the first timing of single events\n")
        print(f"{'events':>10} {'exemplars':>10} {'added':>8} {'RSS MB':>8} {'CPU ms/ev':>10}")
        curve: list[dict[str, Any]] = []
        step = max(n_events // CURVE_POINTS, PREPARE_CHUNK)
        done, mark, last_count = 0, step, store.exemplar_count()
        cpu_at, rss_peak = time.process_time(), 0.0
        started = time.perf_counter()
        release_at = started + Witness.RELEASE_PAGES_EVERY_S
        while done < n_events:
            n = min(PREPARE_CHUNK, n_events - done)
            batch = [(vary(rng.choice(events), rng), f"s-{done + i}", None) for i in range(n)]
            knowledge.observe_many(batch)
            done += n
            if time.perf_counter() >= release_at:  # as the WITNESS process does
                embedder.release_pages()
                release_at = time.perf_counter() + Witness.RELEASE_PAGES_EVERY_S
            if done >= mark or done == n_events:
                rss = proc.memory_info().rss / 2**20
                rss_peak = max(rss_peak, rss)
                count = store.exemplar_count()
                cpu = time.process_time()
                point = {"events": done, "exemplars": count, "added": count - last_count,
                         "rss_mb": round(rss, 1),
                         "cpu_ms_per_event": round((cpu - cpu_at) * 1000 / (done - (
                             curve[-1]["events"] if curve else 0)), 3)}
                curve.append(point)
                print(f"{done:>10,} {count:>10,} {point['added']:>8,} {rss:>8.1f} "
                      f"{point['cpu_ms_per_event']:>10}", flush=True)
                cpu_at, last_count, mark = cpu, count, mark + step
        wall = time.perf_counter() - started
        rounds_after = single_p99(knowledge, probe, "after")
        p99_after = min(rounds_after)
        rss_end = proc.memory_info().rss / 2**20
        rss_peak = max(rss_peak, rss_end)
        hits = store.conn.execute("SELECT coalesce(sum(hits), 0) FROM exemplars "
                                  "WHERE source='detected'").fetchone()[0]
        learned = store.exemplar_count() - seeded
        knowledge.close()
    rss_ok, p99_ok = rss_peak <= TARGET_RSS_MB, p99_after <= TARGET_P99_MS
    print(f"\n{n_events:,} events in {wall:.0f} s ({n_events / wall:,.0f} events/s); "
          f"{learned:,} exemplars learned standing for {hits:,} detections")
    print("single-event p99 by round (ms): before the stream "
          + ", ".join(f"{p:.3f}" for p in rounds_before) + "; after "
          + ", ".join(f"{p:.3f}" for p in rounds_after))
    rows = [
        figure(f"witness stream: peak RSS over {n_events:,} events", round(rss_peak, 1), "MB",
               target=f"<= {TARGET_RSS_MB:g} MB", met=rss_ok),
        figure(f"witness stream: single-event p99 after {n_events:,} events",
               round(p99_after, 3), "ms",
               reference=("single-event p99 on the seeded store", round(p99_before, 3), "ms"),
               target=f"<= {TARGET_P99_MS:g} ms", met=p99_ok),
        figure("witness stream: exemplars at the end", curve[-1]["exemplars"], "exemplars",
               reference=("exemplars seeded", seeded, "exemplars")),
        figure("witness stream: CPU per event, last tenth", curve[-1]["cpu_ms_per_event"], "ms",
               reference=("first tenth", curve[0]["cpu_ms_per_event"], "ms")),
    ]
    print("\n" + format_table(rows))
    write_report(REPORT, {"events": n_events, "seeded": seeded, "curve": curve,
                          "wall_s": round(wall, 1), "learned": learned, "learned_hits": hits,
                          "p99_rounds_ms": {"before": [round(p, 3) for p in rounds_before],
                                            "after": [round(p, 3) for p in rounds_after]},
                          "ok": rss_ok and p99_ok}, rows)
    print(f"\nwrote {REPORT.relative_to(ROOT)}")
    return 0 if rss_ok and p99_ok else 1


if __name__ == "__main__":
    sys.exit(main())
