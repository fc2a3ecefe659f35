"""Benchmark: the journaled bus against raw pyzmq PUB/SUB, between two processes.

    python benchmarks/bench_bus.py            # N = 100,000 (BENCH_SHORT=1: 50,000; BENCH_N=...)

1. raw      pyzmq PUB (connect) -> SUB (bind) over ipc://, the same three frames
            the bus sends (same sizes), unlimited HWM so nothing drops; the
            receiver counts until all N arrived. msgs/s = N / (last received -
            first sent), both on CLOCK_MONOTONIC, which all processes share.
2. bus      a publisher process journals N messages in group-commit batches
            (one transaction per batch, sent after commit) and a consumer process
            applies them durably (its handler writes a row in ``tx.conn``, in the
            transaction that advances its cursor). msgs/s = N / (last durably
            applied, i.e. drain() returned with the cursor at N - first publish).
3. latency  both paths again at a paced rate: one message at a time (the bus
            commits each), publish time in the payload -> time received (raw) or
            time its apply transaction committed (bus); p50/p99.

Each publisher runs on the first CPU and each subscriber on the second. Phases 1 and 2
alternate for 7 trials (BENCH_TRIALS=...), each trial's journaled rate
is divided by the raw rate measured just before it, and the median of those paired
ratios is the figure. Prints each trial and a table, writes ``reports/bench_bus.json``,
exits 1 if that median < 0.5.
``BENCH_PROFILE=DIR`` writes a cProfile of each throughput-phase process to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import zmq
from report_rows import figure, write_report

from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.node import BusNode
from trinity.contract import Topology
from trinity.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "bench_bus.json"
TARGET_RATIO = 0.5

STREAM = "telemetry_stream"  # a real stream name: same topic and envelope sizes as the bus
BEATS = "heartbeats"
PUB_NAME = "bench-pub"
SUB_NAME = "bench-sub"
TOPOLOGY = Topology(
    consumers=MappingProxyType({STREAM: (SUB_NAME,), BEATS: (SUB_NAME,)}),
    ephemeral=frozenset({BEATS}),
)
RAW_SOCK = "raw.sock"


def _payload(i: int) -> bytes:
    # Event-sized payload; t_ns is the publish time for the latency figures.
    return encode_payload({"i": i, "t_ns": time.monotonic_ns(), "kind": "sample",
                           "agent": "witness", "value": i * 0.5})


def _settings(data_dir: str, run_dir: str) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": data_dir, "TRINITY_RUN_DIR": run_dir})


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _wait_file(path: Path, timeout_s: float, tick: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        if tick:
            tick()
        time.sleep(0.01)


def _percentiles(values_us: list[float]) -> dict[str, float]:
    values_us = sorted(values_us)
    if not values_us:
        return {"p50_us": float("nan"), "p99_us": float("nan"), "max_us": float("nan")}
    q = statistics.quantiles(values_us, n=100, method="inclusive")
    return {"p50_us": round(q[49], 1), "p99_us": round(q[98], 1), "max_us": round(values_us[-1], 1)}


# -- raw pyzmq roles -------------------------------------------------------------


def role_raw_sub(args: argparse.Namespace) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)  # unlimited: nothing may drop
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"ipc://{args.run_dir}/{RAW_SOCK}")
    Path(args.run_dir, "raw.bound").touch()
    # Probes (topic b"probe") until the publisher is attached, then the real frames.
    while sub.recv_multipart()[0] == b"probe":
        Path(args.run_dir, "raw.ready").touch()
    first = time.monotonic_ns()
    got, lat = 1, []
    paced = args.paced
    while got < args.n:
        frames = sub.recv_multipart()
        if frames[0] == b"probe":
            continue
        got += 1
        if paced:
            lat.append((time.monotonic_ns() - json.loads(frames[2])["t_ns"]) / 1000)
    last = time.monotonic_ns()
    sub.close()
    ctx.term()
    _emit({"first_recv_ns": first, "last_recv_ns": last, "received": got,
           **(_percentiles(lat) if paced else {})})


def role_raw_pub(args: argparse.Namespace) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, -1)  # deliver everything before exiting
    pub.connect(f"ipc://{args.run_dir}/{RAW_SOCK}")
    ready = Path(args.run_dir, "raw.ready")
    probe = [b"probe", b"{}", b"{}"]
    _wait_file(ready, 20, tick=lambda: pub.send_multipart(probe))
    if args.paced:
        interval = 1.0 / args.rate
        start = time.monotonic()
        first = time.monotonic_ns()
        for i in range(args.n):
            time.sleep(max(0.0, start + i * interval - time.monotonic()))
            msg = Message(STREAM, i + 1, f"{STREAM}/{i}", PUB_NAME, 0, _payload(i))
            pub.send_multipart(msg.frames())
    else:
        # Raw means raw: the frames (exactly the bus's, same sizes) are built beforehand.
        frames = [Message(STREAM, i + 1, f"{STREAM}/{i}", PUB_NAME, int(time.time() * 1000),
                          _payload(i)).frames() for i in range(args.n)]
        # Sent exactly as BusNode.send does it (per frame, int flags, the socket's own
        # send below pyzmq's wrapper), so the two paths differ only by what the bus
        # adds: the journal, envelopes, decoding.
        send, more = super(zmq.Socket, pub).send, int(zmq.SNDMORE)
        first = time.monotonic_ns()
        for topic, envelope, payload in frames:
            send(topic, more)
            send(envelope, more)
            send(payload, 0)
    sent = time.monotonic_ns()
    pub.close()
    ctx.term()
    _emit({"first_send_ns": first, "last_send_ns": sent,
           "frame_bytes": [len(b) for b in Message(STREAM, args.n, f"{STREAM}/{args.n - 1}",
                                                   PUB_NAME, int(time.time() * 1000),
                                                   _payload(args.n - 1)).frames()]})


# -- journaled bus roles -----------------------------------------------------------


def role_bus_sub(args: argparse.Namespace) -> None:
    settings = _settings(args.data_dir, args.run_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    journal = Journal(settings.messages_db, source=SUB_NAME)
    journal.conn.execute("CREATE TABLE IF NOT EXISTS applied (seq INTEGER, idx INTEGER)")
    # Unisolated batches, as WITNESS and the controller run (their handlers write
    # only inside the transaction).
    node = BusNode(SUB_NAME, BusConfig.of(settings), journal, TOPOLOGY, publishes=(), context=ctx,
                   isolate_each=False)
    pending: list[int] = []  # publish times of messages applied in the open transaction
    lat: list[float] = []
    first_pub_ns = 0

    def handler(msg: Message, tx: Transaction) -> None:
        # One durable write per message, in the transaction that advances the cursor.
        # The payload is parsed only where a timestamp is needed, as the raw receiver
        # parses nothing in the throughput phase.
        nonlocal first_pub_ns
        tx.conn.execute("INSERT INTO applied(seq, idx) VALUES (?, ?)", (msg.seq, msg.seq - 1))
        if msg.seq == 1 or args.paced:
            t_ns = json.loads(msg.payload)["t_ns"]
            first_pub_ns = first_pub_ns or t_ns
            if args.paced:
                pending.append(t_ns)

    ready = Path(args.run_dir, "bus.ready")
    cursor = 0
    deadline = time.monotonic() + args.timeout
    while cursor < args.n:
        node.receive(timeout_ms=5)
        if node.ephemeral_inbox:  # the publisher's probe: its connection is attached
            node.ephemeral_inbox.clear()
            ready.touch()
        if node.drain(handler) and args.paced:
            now = time.monotonic_ns()  # drain() returned: the batch is committed
            lat.extend((now - t) / 1000 for t in pending)
        pending.clear()
        cursor = node.cursors()[STREAM]
        if time.monotonic() > deadline:
            raise SystemExit(f"bus consumer timed out at cursor {cursor}")
    last = time.monotonic_ns()
    counters = node.counters.as_dict()
    rows = journal.conn.execute("SELECT count(*), count(DISTINCT seq) FROM applied").fetchone()
    node.close()
    journal.close()
    ctx.term()
    _emit({"first_publish_ns": first_pub_ns, "last_applied_ns": last, "counters": counters,
           "applied_rows": rows[0], "distinct_seqs": rows[1],
           **(_percentiles(lat) if args.paced else {})})


def role_bus_pub(args: argparse.Namespace) -> None:
    settings = _settings(args.data_dir, args.run_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    journal = Journal(settings.messages_db, source=PUB_NAME)
    # The bus as deployed: default high-water marks (what the wire drops, the journal repairs).
    node = BusNode(PUB_NAME, BusConfig.of(settings), journal, TOPOLOGY, publishes=(STREAM, BEATS),
                   context=ctx)
    ready = Path(args.run_dir, "bus.ready")
    _wait_file(ready, 20, tick=lambda: node.send_ephemeral(BEATS, {"probe": True}))
    first = time.monotonic_ns()
    if args.paced:
        interval = 1.0 / args.rate
        start = time.monotonic()
        for i in range(args.n):
            time.sleep(max(0.0, start + i * interval - time.monotonic()))
            with journal.transaction() as tx:
                tx.publish(STREAM, _payload(i), key=str(i))
            node.send(tx.published)
    else:
        # As for raw, payloads are the application's and are encoded beforehand; the
        # bus's own work (ids, sequence numbers, journal, envelopes, send) is timed.
        payloads = [_payload(i) for i in range(args.n)]
        first = time.monotonic_ns()
        for lo in range(0, args.n, args.batch):
            with journal.transaction() as tx:
                tx.publish_many(STREAM, [(payloads[i], str(i))
                                         for i in range(lo, min(lo + args.batch, args.n))])
            node.send(tx.published)
    last = time.monotonic_ns()
    node.close()
    journal.close()
    ctx.term()
    _emit({"first_send_ns": first, "last_send_ns": last})


ROLES = {"raw-sub": role_raw_sub, "raw-pub": role_raw_pub,
         "bus-sub": role_bus_sub, "bus-pub": role_bus_pub}


# -- orchestration ------------------------------------------------------------------


def _pin(role: str) -> None:
    """Publisher on the first CPU, subscriber on the second, for raw and bus alike (the
    zmq I/O thread, started later, inherits it): left to the scheduler, the two processes
    and their I/O threads migrate and share a core for part of a trial, which swung the
    journaled/raw ratio between 0.41 and 0.82 from one 0.1 s trial to the next."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0] if role.endswith("-pub") else cpus[1]})


def _spawn(role: str, n: int, data_dir: Path, run_dir: Path, **extra: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--n", str(n),
           "--data-dir", str(data_dir), "--run-dir", str(run_dir)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())


def _collect(proc: subprocess.Popen[str], timeout_s: float, what: str) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SystemExit(f"{what} did not finish within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise SystemExit(f"{what} exited {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _pair(sub_role: str, pub_role: str, n: int, timeout_s: float,
          **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    run_dir = Path(tempfile.mkdtemp(prefix="bb", dir="/tmp"))
    data_dir = Path(tempfile.mkdtemp(prefix="bench-bus-"))
    try:
        sub = _spawn(sub_role, n, data_dir, run_dir, **extra)
        _wait_file(run_dir / ("raw.bound" if sub_role == "raw-sub" else f"{SUB_NAME}.sock"), 20)
        pub = _spawn(pub_role, n, data_dir, run_dir, **extra)
        pub_result = _collect(pub, timeout_s, pub_role)
        sub_result = _collect(sub, timeout_s, sub_role)
        return sub_result, pub_result
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=sorted(ROLES))
    short = os.environ.get("BENCH_SHORT", "") not in ("", "0")
    ap.add_argument("--n", type=int, default=int(os.environ.get("BENCH_N") or
                                                (50_000 if short else 100_000)))
    ap.add_argument("--trials", type=int, default=int(os.environ.get("BENCH_TRIALS") or 7),
                    help="alternating raw/bus throughput trials; the median paired "
                         "ratio is the figure")
    ap.add_argument("--batch", type=int, default=500, help="messages per group commit")
    ap.add_argument("--paced", type=int, default=0)
    ap.add_argument("--rate", type=float, default=2000.0, help="paced messages per second")
    ap.add_argument("--latency-n", type=int, default=2000 if short else 5000)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    if args.role:
        _pin(args.role)
        profile_dir = os.environ.get("BENCH_PROFILE")  # e.g. BENCH_PROFILE=/tmp/prof
        if profile_dir and not args.paced:
            import cProfile

            cProfile.runctx("ROLES[args.role](args)", globals(), {"args": args},
                            str(Path(profile_dir) / f"{args.role}.prof"))
        else:
            ROLES[args.role](args)
        return 0

    n = args.n
    print(f"bench-bus: N={n:,} messages x {args.trials} trials, group commit {args.batch}, "
          f"latency at {args.rate:,.0f} msg/s x {args.latency_n:,}, {os.cpu_count()} CPUs")
    # Throughput trials alternate raw and bus so that both see the same machine, and each
    # bus trial is compared with the raw trial just before it: on a shared 2-core VM one
    # 0.1 s trial (N = 20,000) swung by +-25 % and a CI run's five paired ratios ranged
    # 0.34-0.92, so even the short form now times 50,000 messages (~0.3 s a trial) in
    # seven trials, and the median of the paired ratios is the figure.
    raw_rates: list[float] = []
    bus_rates: list[float] = []
    pub_rates: list[float] = []
    for trial in range(args.trials):
        raw_sub, raw_pub = _pair("raw-sub", "raw-pub", n, 120)
        assert raw_sub["received"] == n
        raw_rates.append(n / ((raw_sub["last_recv_ns"] - raw_pub["first_send_ns"]) / 1e9))
        bus_sub, bus_pub = _pair("bus-sub", "bus-pub", n, 180, batch=args.batch)
        assert bus_sub["applied_rows"] == n and bus_sub["distinct_seqs"] == n, bus_sub
        bus_rates.append(n / ((bus_sub["last_applied_ns"] - bus_pub["first_send_ns"]) / 1e9))
        pub_rates.append(n / ((bus_pub["last_send_ns"] - bus_pub["first_send_ns"]) / 1e9))
        print(f"  trial {trial + 1}/{args.trials}: raw {raw_rates[-1]:,.0f} msgs/s, "
              f"journaled {bus_rates[-1]:,.0f} msgs/s ({bus_rates[-1] / raw_rates[-1]:.3f})",
              flush=True)
    raw_rate = statistics.median(raw_rates)
    bus_rate = statistics.median(bus_rates)
    pub_rate = statistics.median(pub_rates)
    raw_s, bus_s = n / raw_rate, n / bus_rate

    lat_args = {"paced": 1, "rate": args.rate}
    raw_lat, _ = _pair("raw-sub", "raw-pub", args.latency_n, 60, **lat_args)
    bus_lat, _ = _pair("bus-sub", "bus-pub", args.latency_n, 60, **lat_args)

    ratio = statistics.median(b / r for b, r in zip(bus_rates, raw_rates, strict=True))
    ok = ratio >= TARGET_RATIO
    rows = [
        ("raw pyzmq PUB/SUB", f"{raw_rate:,.0f}", f"{raw_lat['p50_us']:,.0f}",
         f"{raw_lat['p99_us']:,.0f}"),
        ("journaled bus", f"{bus_rate:,.0f}", f"{bus_lat['p50_us']:,.0f}",
         f"{bus_lat['p99_us']:,.0f}"),
    ]
    print(f"\n{'path (median)':<22}{'msgs/s':>12}{'p50 us':>10}{'p99 us':>10}")
    for row in rows:
        print(f"{row[0]:<22}{row[1]:>12}{row[2]:>10}{row[3]:>10}")
    print(f"\njournaled publisher alone (commit + send): {pub_rate:,.0f} msgs/s")
    print(f"bus consumer (last trial) received live {bus_sub['counters']['received']:,} of {n:,}, "
          f"applied {bus_sub['counters']['applied']:,}")
    print(f"ratio of the medians = {bus_rate / raw_rate:.3f}")
    print(f"ratio journaled/raw = {ratio:.3f} (median of the {len(raw_rates)} paired trials)"
          f"  (target >= {TARGET_RATIO})  {'OK' if ok else 'MISSED'}")

    paced_at = f"at {args.rate:,.0f} msgs/s"
    table_rows = [
        figure("bus: journaled throughput", round(bus_rate), "msgs/s",
               reference=("raw pyzmq PUB/SUB", round(raw_rate), "msgs/s"), ratio=ratio,
               target=f">= {TARGET_RATIO} x reference (median of paired trials)", met=ok),
        *(figure(f"bus: journaled {q} latency {paced_at}", bus_lat[f"{q}_us"], "us",
                 reference=(f"raw pyzmq PUB/SUB {q}", raw_lat[f"{q}_us"], "us"))
          for q in ("p50", "p99")),
    ]
    report = {
        "n": n,
        "group_commit": args.batch,
        "trials": args.trials,
        "frame_bytes": raw_pub["frame_bytes"],
        "cpus": os.cpu_count(),
        "raw": {"msgs_per_s": round(raw_rate), "seconds": round(raw_s, 3),
                "trials_msgs_per_s": [round(r) for r in raw_rates],
                "latency": {k: raw_lat[k] for k in ("p50_us", "p99_us", "max_us")}},
        "journaled": {"msgs_per_s": round(bus_rate), "seconds": round(bus_s, 3),
                      "trials_msgs_per_s": [round(r) for r in bus_rates],
                      "publisher_msgs_per_s": round(pub_rate),
                      "consumer_counters": bus_sub["counters"],
                      "latency": {k: bus_lat[k] for k in ("p50_us", "p99_us", "max_us")}},
        "latency_rate_per_s": args.rate,
        "latency_n": args.latency_n,
        "ratio": round(ratio, 4),
        "ratio_of_medians": round(bus_rate / raw_rate, 4),
        "target_ratio": TARGET_RATIO,
        "target_met": ok,
    }
    write_report(REPORT, report, table_rows)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
