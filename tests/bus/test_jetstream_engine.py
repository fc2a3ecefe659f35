"""The engine the multi-host bus is to run on, as installed: a 3-node JetStream cluster
on loopback, a replicated file stream, the server's dedupe of a republished message id,
and a kill -9 of the stream's leader mid-stream losing and doubling nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from tests.nats_cluster import MIN_VERSION, NatsCluster, server_version

STREAM = StreamConfig(name="EVENTS", subjects=["events.>"], num_replicas=3,
                      storage=StorageType.FILE, duplicate_window=120.0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats")
    nodes.root.mkdir()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def test_the_pinned_server_is_recent_enough() -> None:
    assert server_version() >= MIN_VERSION


def test_a_republished_message_id_is_stored_once(cluster: NatsCluster) -> None:
    async def run() -> tuple[bool, bool, int]:
        nc = await cluster.connect()
        try:
            js = nc.jetstream()
            await js.add_stream(STREAM)
            first = await js.publish("events.a", b"1", headers={"Nats-Msg-Id": "m1"})
            again = await js.publish("events.a", b"1", headers={"Nats-Msg-Id": "m1"})
            info = await js.stream_info("EVENTS")
            return first.duplicate or False, again.duplicate or False, info.state.messages
        finally:
            await nc.close()

    assert asyncio.run(run()) == (False, True, 1)


async def _publish(js: nats.js.JetStreamContext, n: int) -> None:
    """Message ``n`` with its id, retried until a leader takes it (an election after a
    kill answers with timeouts or no responders for a few seconds)."""
    for _ in range(200):
        try:
            await js.publish("events.x", str(n).encode(), timeout=1,
                             headers={"Nats-Msg-Id": f"m{n}"})
            return
        except (NatsTimeout, NoRespondersError, NoStreamResponseError,
                ServiceUnavailableError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"message {n} never stored")


def test_kill_9_of_the_stream_leader_loses_and_doubles_nothing(cluster: NatsCluster) -> None:
    async def run() -> tuple[str, str | None, list[int]]:
        nc = await cluster.connect(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream()
            await js.add_stream(STREAM)
            for n in range(50):
                await _publish(js, n)
            leader = (await js.stream_info("EVENTS")).cluster.leader
            assert leader is not None
            cluster.kill(leader)
            for n in range(50, 100):
                await _publish(js, n)
            for n in range(40, 60):  # republished around the kill: dropped by the server
                await _publish(js, n)
            info = await js.stream_info("EVENTS")
            # The consumer is a replicated group of its own, made while a node is down:
            # asked again until the cluster answers (a busy host can take seconds).
            sub = None
            for _ in range(30):
                try:
                    sub = await js.pull_subscribe("events.>", durable="reader")
                    break
                except (NatsTimeout, NoRespondersError, ServiceUnavailableError):
                    await asyncio.sleep(0.5)
            assert sub is not None, "no durable consumer in 30 tries"
            got: list[int] = []
            for _ in range(30):  # fetches of up to 5 s each; a lost message ends it short
                if len(got) >= info.state.messages:
                    break
                try:
                    batch = await sub.fetch(100, timeout=5)
                except NatsTimeout:
                    continue
                for msg in batch:
                    got.append(int(msg.data))
                    await msg.ack()
            return leader, info.cluster.leader, got
        finally:
            await nc.close()

    killed, leader, got = asyncio.run(run())
    assert leader is not None and leader != killed
    assert got == list(range(100))
