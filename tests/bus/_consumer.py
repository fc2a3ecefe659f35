"""Helper process: apply ``alpha``/``beta`` from the journal into table ``applied``.

The handler inserts (stream, seq, msg_id, payload index) in the node's own
transaction, so the row commits atomically with the cursor advance. The process
exits 0 once its cursors reach ``--expect`` on every stream, after writing its
counters as JSON to ``--stats``.

    python tests/bus/_consumer.py DATA_DIR RUN_DIR --expect alpha=5000,beta=5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import APPLIED_DDL, CONSUMER, TOPOLOGY, make_settings, record_applied  # noqa: E402

from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, Transaction  # noqa: E402
from trinity.bus.message import Message  # noqa: E402
from trinity.bus.node import BusNode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("run_dir")
    ap.add_argument("--expect", required=True, help="stream=count,... cursors to reach")
    ap.add_argument("--handler-delay", type=float, default=0.0,
                    help="seconds of work per message (widens the kill window)")
    ap.add_argument("--stats", default="", help="write counters here as JSON on exit")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    expect = {k: int(v) for k, v in (item.split("=") for item in args.expect.split(","))}

    settings = make_settings(args.data_dir, args.run_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    journal = Journal(settings.messages_db, source=CONSUMER)
    journal.conn.execute(APPLIED_DDL)
    node = BusNode(CONSUMER, BusConfig.of(settings), journal, TOPOLOGY, publishes=(), context=ctx)

    def handler(msg: Message, tx: Transaction) -> None:
        record_applied(msg, tx)
        if args.handler_delay:
            time.sleep(args.handler_delay)

    deadline = time.monotonic() + args.timeout
    try:
        while True:
            node.receive(timeout_ms=50)
            node.drain(handler)
            node.ephemeral_inbox.clear()
            cursors = node.cursors()
            if all(cursors.get(s, 0) >= n for s, n in expect.items()):
                break
            if time.monotonic() > deadline:
                print(f"consumer timed out at cursors {cursors}", file=sys.stderr)
                return 3
        if args.stats:
            Path(args.stats).write_text(json.dumps(node.counters.as_dict()))
    finally:
        node.close()
        journal.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
