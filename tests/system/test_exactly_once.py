"""ACCEPTANCE: exactly-once, in-order application through random ``kill -9``.

Two OS processes share the journal: ``_publisher.py`` publishes 5,000 keyed
messages on each of two streams in batches (one transaction per batch, sent on
the wire after commit, a short sleep between batches so the run lasts seconds);
``_consumer.py`` applies them, its handler inserting a row into ``applied`` in
the node's transaction. ``applied`` has no unique constraint, so a message
applied twice shows up as two rows, and a lost one as a missing index.

The test SIGKILLs the consumer at least three times at random moments (some
right after a restart, while it is catching up on a backlog inside its apply
transactions) and the publisher once; both are restarted (the publisher starts
again from index 0 and relies on keyed idempotency). The seed is printed in the
failure message so that a failing schedule can be replayed with
``TRINITY_TEST_SEED``.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from tests.bus._common import ALPHA, BETA, CONSUMER, applied_rows, exactly_once_problems
from tests.system.conftest import Procs, wait_until

PER_STREAM = 5_000
EXPECT = {ALPHA: PER_STREAM, BETA: PER_STREAM}
PUBLISHER_ARGS = (
    "--count", str(PER_STREAM), "--streams", f"{ALPHA},{BETA}", "--batch", "25", "--sleep", "0.03",
)
CONSUMER_ARGS = (
    "--expect", f"{ALPHA}={PER_STREAM},{BETA}={PER_STREAM}",
    # ~0.1 ms of work per message: a 500-message catch-up batch is a ~50 ms
    # transaction, so kills land inside apply transactions, not only in poll().
    "--handler-delay", "0.0001",
    "--timeout", "90",
)


def _sock(run_dir: Path) -> Path:
    return run_dir / f"{CONSUMER}.sock"


def _applied_count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=10)
    try:
        row = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='applied'"
        ).fetchone()
        if not row[0]:
            return 0
        return int(conn.execute("SELECT count(*) FROM applied").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_exactly_once_in_order_through_kill_9(
    procs: Procs, bus_data_dir: Path, bus_run_dir: Path
) -> None:
    seed = int(os.environ.get("TRINITY_TEST_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    ctx = f"(seed {seed})"
    db = bus_data_dir / "trinity_messages.db"

    consumer = procs.consumer(*CONSUMER_ARGS)
    wait_until(lambda: _sock(bus_run_dir).exists(), 15, "the consumer's socket")
    publisher = procs.publisher(*PUBLISHER_ARGS)

    # The schedule, in seconds after the publisher starts (publishing lasts ~7 s).
    events: list[tuple[float, str]] = [(rng.uniform(1.5, 4.0), "publisher")]
    t = 0.0
    for _ in range(rng.randint(3, 4)):
        t += rng.uniform(0.5, 1.1)
        events.append((t, "consumer"))
    events.sort()

    start = time.monotonic()
    consumer_kills = publisher_kills = 0
    applied_at_kill: list[int] = []
    for at, who in events:
        time.sleep(max(0.0, start + at - time.monotonic()))
        if who == "publisher":
            assert Procs.kill9(publisher), f"publisher had already exited before its kill {ctx}"
            publisher_kills += 1
            publisher = procs.publisher(*PUBLISHER_ARGS)  # starts again from index 0
            continue
        assert Procs.kill9(consumer), f"consumer had already exited before kill {ctx}"
        consumer_kills += 1
        applied_at_kill.append(_applied_count(db))
        # Stay down a while so a backlog builds up, then restart; sometimes kill
        # again shortly after the restart, in the middle of catching up.
        time.sleep(rng.uniform(0.2, 0.8))
        consumer = procs.consumer(*CONSUMER_ARGS)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.15, 0.35))
            if Procs.kill9(consumer):
                consumer_kills += 1
                applied_at_kill.append(_applied_count(db))
                consumer = procs.consumer(*CONSUMER_ARGS)

    assert consumer_kills >= 3 and publisher_kills == 1, ctx
    procs.finish(publisher, 60, f"the restarted publisher {ctx}")
    procs.finish(consumer, 60, f"the consumer catching up {ctx}")

    rows = applied_rows(db)
    problems = exactly_once_problems(rows, EXPECT)
    assert not problems, f"{ctx} kills at applied counts {applied_at_kill}: {problems}"
    # The kills really interrupted the work: the consumer was killed mid-run.
    assert any(0 < n < 2 * PER_STREAM for n in applied_at_kill), (
        f"{ctx} no kill landed while messages were being applied: {applied_at_kill}"
    )

    conn = sqlite3.connect(db)
    try:
        cursors = dict(conn.execute("SELECT stream, seq FROM cursors WHERE consumer=?",
                                    (CONSUMER,)).fetchall())
        heads = dict(conn.execute("SELECT stream, head FROM streams").fetchall())
        letters = conn.execute("SELECT reason FROM dead_letters").fetchall()
    finally:
        conn.close()
    assert cursors == {ALPHA: PER_STREAM, BETA: PER_STREAM}, ctx
    assert heads[ALPHA] == PER_STREAM and heads[BETA] == PER_STREAM, ctx  # republish added none
    assert letters == [], ctx
