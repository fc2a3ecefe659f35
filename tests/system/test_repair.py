"""ACCEPTANCE 4: what the wire drops, the journal repairs.

(a) Slow joiner: everything was published before the consumer process existed
    (on the wire it all went nowhere); the consumer still applies each message
    exactly once, in order. A variant starts the consumer half-way through.
(b) High-water-mark overflow: a consumer with ``rcvhwm=10`` stalls while a
    publisher bursts 1,000 messages; the wire really drops most of them
    (``counters.received < 1000``) and the consumer still ends with all 1,000
    applied exactly once, in order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq

from tests.bus._common import (
    ALPHA,
    APPLIED_DDL,
    BETA,
    CONSUMER,
    TOPOLOGY,
    applied_rows,
    exactly_once_problems,
    record_applied,
)
from tests.system.conftest import Procs, wait_until
from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal
from trinity.bus.node import BusNode
from trinity.settings import Settings


def _head(db: Path, stream: str) -> int:
    j = Journal(db, source="probe")
    try:
        return j.head(stream)
    finally:
        j.close()


def test_slow_joiner_gets_everything_published_before_it_existed(
    procs: Procs, bus_data_dir: Path, bus_run_dir: Path
) -> None:
    db = bus_data_dir / "trinity_messages.db"
    publisher = procs.publisher("--count", "500", "--streams", f"{ALPHA},{BETA}",
                                "--batch", "50")
    procs.finish(publisher, 30, "the publisher")
    assert not (bus_run_dir / f"{CONSUMER}.sock").exists()  # nobody was listening
    assert _head(db, ALPHA) == 500 and _head(db, BETA) == 500

    stats = bus_data_dir / "stats.json"
    consumer = procs.consumer("--expect", f"{ALPHA}=500,{BETA}=500", "--stats", str(stats))
    procs.finish(consumer, 30, "the consumer")

    assert exactly_once_problems(applied_rows(db), {ALPHA: 500, BETA: 500}) == []
    counters = json.loads(stats.read_text())
    assert counters["received"] == 0  # nothing came over the wire ...
    assert counters["applied"] == 1000  # ... the journal supplied all of it
    assert counters["dead_lettered"] == 0


def test_consumer_joining_mid_stream_gets_the_start_from_the_journal(
    procs: Procs, bus_data_dir: Path, bus_run_dir: Path
) -> None:
    db = bus_data_dir / "trinity_messages.db"
    publisher = procs.publisher("--count", "500", "--streams", f"{ALPHA},{BETA}",
                                "--batch", "10", "--sleep", "0.04")
    wait_until(lambda: db.exists() and _head(db, ALPHA) >= 150, 20, "a third of the messages")
    stats = bus_data_dir / "stats.json"
    consumer = procs.consumer("--expect", f"{ALPHA}=500,{BETA}=500", "--stats", str(stats))
    procs.finish(publisher, 30, "the publisher")
    procs.finish(consumer, 30, "the consumer")

    assert exactly_once_problems(applied_rows(db), {ALPHA: 500, BETA: 500}) == []
    counters = json.loads(stats.read_text())
    assert counters["applied"] == 1000
    # The early messages can only have come from the journal, the late ones did
    # arrive live too (and were applied once, not twice).
    assert 0 < counters["applied_live"] < 1000 - 2 * 150


def test_hwm_overflow_is_repaired_from_the_journal(
    procs: Procs, bus_settings: Settings, bus_data_dir: Path,
    zmq_ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    total = 1000
    journal = Journal(bus_settings.messages_db, source=CONSUMER)
    journal.conn.execute(APPLIED_DDL)
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx,
                   rcvhwm=10)
    probes = 0
    try:
        go = bus_data_dir / "go"
        # PUB's own queue (SNDHWM, default 1000) would otherwise absorb the whole
        # burst; with 50 + our 10 + the kernel's buffer, most of it must drop.
        publisher = procs.publisher("--count", str(total), "--streams", ALPHA, "--batch", "100",
                                    "--pad", "2000", "--sndhwm", "50", "--probe-until", str(go))

        # The slow-joiner fact: the SUB side only attaches the publisher's
        # connection when this thread calls into the socket, so wait for a probe.
        def probed() -> bool:
            node.receive(timeout_ms=20)
            return bool(node.ephemeral_inbox)

        wait_until(probed, 15, "a probe from the publisher", interval_s=0)
        go.touch()
        # Stall: do not touch the socket while the publisher bursts all 1,000.
        procs.finish(publisher, 30, "the publisher")
        assert node.counters.received < 20  # only probes so far

        def caught_up() -> bool:
            node.receive(timeout_ms=20)
            node.drain(record_applied)
            return node.cursors()[ALPHA] >= total

        wait_until(caught_up, 30, "the consumer to catch up", interval_s=0)
        time.sleep(0.1)
        node.receive(timeout_ms=50)  # anything still in flight
        probes = len(node.ephemeral_inbox)
        counters = node.counters
    finally:
        node.close()
        journal.close()

    live_durable = counters.received - probes
    assert counters.received < total, f"no drops happened: {counters}"
    assert live_durable < total
    assert counters.applied == total
    assert counters.applied_live <= live_durable
    assert counters.dead_lettered == 0 and counters.retries == 0
    rows = applied_rows(bus_settings.messages_db)
    assert exactly_once_problems(rows, {ALPHA: total}) == []
