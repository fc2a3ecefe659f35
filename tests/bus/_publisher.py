"""Helper process: publish ``--count`` keyed messages on each of ``--streams``.

Message ``i`` of stream ``s`` has key ``"{s}-{i}"``, so a restarted publisher
starting again from 0 re-publishes idempotently (the journal ignores known keys)
and carries on where the killed one stopped. Each batch is one journal
transaction, sent on the wire after its commit.

    python tests/bus/_publisher.py DATA_DIR RUN_DIR --count 5000 --streams alpha,beta
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BEATS, PUBLISHER, TOPOLOGY, make_settings  # noqa: E402

from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal  # noqa: E402
from trinity.bus.message import encode_payload  # noqa: E402
from trinity.bus.node import BusNode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("run_dir")
    ap.add_argument("--count", type=int, required=True, help="messages per stream")
    ap.add_argument("--streams", default="alpha,beta")
    ap.add_argument("--batch", type=int, default=50, help="indices per transaction")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds between batches")
    ap.add_argument("--pad", type=int, default=0, help="extra payload bytes")
    ap.add_argument("--sndhwm", type=int, default=0, help="PUB high-water mark (0: default)")
    ap.add_argument("--probe-until", default="",
                    help="send ephemeral probes until this file exists, then publish")
    args = ap.parse_args()

    streams = args.streams.split(",")
    settings = make_settings(args.data_dir, args.run_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    if args.sndhwm:
        ctx.setsockopt(zmq.SNDHWM, args.sndhwm)  # default for the sockets made below
    journal = Journal(settings.messages_db, source=PUBLISHER)
    node = BusNode(PUBLISHER, BusConfig.of(settings), journal, TOPOLOGY,
                   publishes=(*streams, BEATS), context=ctx)
    try:
        if args.probe_until:
            probe = Path(args.probe_until)
            deadline = time.monotonic() + 30
            while not probe.exists():
                if time.monotonic() > deadline:
                    print("probe file never appeared", file=sys.stderr)
                    return 2
                node.send_ephemeral(BEATS, {"probe": os.getpid()})
                time.sleep(0.02)
        pad = "x" * args.pad
        for start in range(0, args.count, args.batch):
            with journal.transaction() as tx:
                for i in range(start, min(start + args.batch, args.count)):
                    for stream in streams:
                        payload = {"i": i, "t_ns": time.time_ns()}
                        if pad:
                            payload["pad"] = pad
                        tx.publish(stream, encode_payload(payload), key=f"{stream}-{i}")
            node.send(tx.published)
            if tx.published and args.sleep:
                time.sleep(args.sleep)
    finally:
        node.close()
        journal.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
