"""ZeroMQ CURVE on the bus: endpoints off loopback need keys, and with keys a client
that is not one of ours (no CURVE, or a key nobody admitted) never gets a message to
a real BusNode, while the authenticated publisher's messages are applied.

Also: ``TRINITY_ENDPOINTS`` and ``TRINITY_CURVE_DIR`` as Settings read them, the
topology every process uses, and ``trinity keys generate``.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner
from zmq.utils.monitor import recv_monitor_message

from tests.bus._common import (
    ALPHA,
    APPLIED_DDL,
    BEATS,
    CONSUMER,
    PUBLISHER,
    TOPOLOGY,
    applied_rows,
    make_settings,
    record_applied,
)
from trinity.bus import curve
from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal
from trinity.bus.message import Message
from trinity.bus.node import BusNode
from trinity.cli.keys import keys as keys_command
from trinity.clock import now_ms
from trinity.contract import TELEMETRY
from trinity.contract import TOPOLOGY as TRINITY_TOPOLOGY
from trinity.errors import ConfigError
from trinity.settings import CURVE_DIR_NAME, Settings

PROCESSES = ("architect", "controller", "executor", "witness")
HANDSHAKE_FAILED = frozenset({zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                              zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                              zmq.EVENT_HANDSHAKE_FAILED_AUTH})


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _env(data_dir: Path, **variables: str) -> dict[str, str]:
    return {"TRINITY_DATA_DIR": str(data_dir), **variables}


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    curve.generate(directory, PROCESSES + (CONSUMER, PUBLISHER))
    return directory


# -- trinity keys generate ---------------------------------------------------------


def _public_keys(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (directory / curve.PUBLIC_DIR).iterdir()}


def test_keys_generate_writes_one_private_pair_per_process(tmp_path: Path) -> None:
    target = tmp_path / "k"
    result = CliRunner().invoke(keys_command, ["generate", "--dir", str(target)])
    assert result.exit_code == 0, result.output
    assert f"wrote 4 key pairs to {target}" in result.output
    public, private = target / curve.PUBLIC_DIR, target / curve.PRIVATE_DIR
    assert sorted(p.name for p in public.iterdir()) == [f"{n}.key" for n in PROCESSES]
    assert sorted(p.name for p in private.iterdir()) == [f"{n}.key_secret" for n in PROCESSES]
    assert (_mode(target), _mode(public), _mode(private)) == (0o700, 0o700, 0o700)
    assert {_mode(p) for p in private.iterdir()} == {0o600}
    assert {_mode(p) for p in public.iterdir()} == {0o644}
    for name in PROCESSES:  # public files hold no secret; each secret file its own pair
        assert zmq.auth.load_certificate(public / f"{name}.key")[1] is None
        keys = curve.BusKeys.load(target, name)
        assert keys.public == keys.peers[name] and len(keys.secret) == 40


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "k"
    runner = CliRunner()
    assert runner.invoke(keys_command, ["generate", "--dir", str(target)]).exit_code == 0
    before = _public_keys(target)
    again = runner.invoke(keys_command, ["generate", "--dir", str(target)])
    assert again.exit_code == 1
    assert "already holds CURVE keys; --force replaces them" in again.output
    assert _public_keys(target) == before
    forced = runner.invoke(keys_command, ["generate", "--dir", str(target), "--force"])
    assert forced.exit_code == 0, forced.output
    after = _public_keys(target)
    assert sorted(after) == sorted(before)
    assert not set(after.values()) & set(before.values())  # no old identity stays admitted


def test_keys_generate_defaults_to_the_data_dir_and_settings_find_them(tmp_path: Path) -> None:
    result = CliRunner().invoke(keys_command, ["generate"], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / CURVE_DIR_NAME / curve.PRIVATE_DIR / "witness.key_secret").is_file()
    assert Settings.from_env(_env(tmp_path)).curve_dir == tmp_path / CURVE_DIR_NAME


# -- settings ----------------------------------------------------------------------


def test_endpoints_are_read_from_trinity_endpoints(tmp_path: Path) -> None:
    settings = Settings.from_env(_env(
        tmp_path, TRINITY_ENDPOINTS=" witness=tcp://127.0.0.1:5551, controller=ipc:///tmp/c.sock"))
    assert dict(settings.endpoints) == {"witness": "tcp://127.0.0.1:5551",
                                        "controller": "ipc:///tmp/c.sock"}
    assert settings.curve_dir is None
    assert dict(Settings.from_env(_env(tmp_path)).endpoints) == {}


@pytest.mark.parametrize(("value", "message"), [
    ("witness", "'witness' is not name=endpoint"),
    ("witness=", "'witness=' is not name=endpoint"),
    ("=tcp://127.0.0.1:5551", "is not name=endpoint"),
    ("ghost=tcp://127.0.0.1:5551", "'ghost' is not a process; the processes are architect, "
                                   "controller, executor, witness"),
    ("witness=http://127.0.0.1:5551", "only ipc:// and tcp:// are supported"),
    ("witness=tcp://127.0.0.1", "is not tcp://<host>:<port>"),
    ("witness=tcp://127.0.0.1:*", "is not tcp://<host>:<port>"),
    ("witness=tcp://127.0.0.1:70000", "is not tcp://<host>:<port>"),
    ("witness=ipc://", "has no socket path"),
    ("witness=ipc:///tmp/a,witness=ipc:///tmp/b", "'witness' is given twice"),
])
def test_bad_endpoints_are_a_config_error(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^TRINITY_ENDPOINTS: ") as info:
        Settings.from_env(_env(tmp_path, TRINITY_ENDPOINTS=value))
    assert message in str(info.value)


@pytest.mark.parametrize("endpoint", ["tcp://10.1.0.2:5551", "tcp://0.0.0.0:5551",
                                      "tcp://*:5551", "tcp://trinity.example.com:5551",
                                      "tcp://[2001:db8::1]:5551"])
def test_an_endpoint_off_loopback_needs_keys(tmp_path: Path, keys_dir: Path,
                                             endpoint: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(_env(tmp_path, TRINITY_ENDPOINTS=f"witness={endpoint}"))
    assert str(info.value) == (
        f"endpoint witness={endpoint} is not on loopback and no ZeroMQ CURVE keys are "
        "configured; run `trinity keys generate` (or set TRINITY_CURVE_DIR to a folder of keys)")
    settings = Settings.from_env(_env(tmp_path, TRINITY_ENDPOINTS=f"witness={endpoint}",
                                      TRINITY_CURVE_DIR=str(keys_dir)))
    assert settings.curve_dir == keys_dir and settings.endpoints["witness"] == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5551", "tcp://127.8.9.10:5551",
                                      "tcp://localhost:5551", "tcp://[::1]:5551",
                                      "ipc:///tmp/w.sock"])
def test_loopback_endpoints_need_no_keys(tmp_path: Path, endpoint: str) -> None:
    settings = Settings.from_env(_env(tmp_path, TRINITY_ENDPOINTS=f"witness={endpoint}"))
    assert settings.endpoints["witness"] == endpoint


def test_a_named_key_folder_without_keys_is_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        settings = Settings.from_env(_env(tmp_path, TRINITY_CURVE_DIR=str(folder)))
        with pytest.raises(ConfigError, match=f"CURVE key folder {folder} holds no public keys"
                           r".*; run `trinity keys generate --dir "):
            BusConfig.of(settings).check()  # what `trinity run` asks before it starts


def test_secret_keys_readable_by_others_are_a_config_error(tmp_path: Path,
                                                           keys_dir: Path) -> None:
    (keys_dir / curve.PRIVATE_DIR).chmod(0o750)
    settings = Settings.from_env(_env(tmp_path, TRINITY_CURVE_DIR=str(keys_dir)))
    with pytest.raises(ConfigError, match="is readable by others .*chmod 700"):
        BusConfig.of(settings).check()


def test_a_process_without_its_secret_key_does_not_start(
    tmp_path: Path, keys_dir: Path
) -> None:
    (keys_dir / curve.PRIVATE_DIR / "witness.key_secret").unlink()
    settings = Settings.from_env(_env(tmp_path, TRINITY_CURVE_DIR=str(keys_dir),
                                      TRINITY_RUN_DIR=str(tmp_path / "run")))
    journal = Journal(settings.messages_db, source="test")
    try:
        with pytest.raises(ConfigError, match="no CURVE secret key for 'witness'"):
            BusNode("witness", BusConfig.of(settings), journal, TRINITY_TOPOLOGY)
    finally:
        journal.close()


# -- the topology every process uses ----------------------------------------------------


@pytest.fixture
def short_run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ts", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_node_in_code_refuses_an_endpoint_off_loopback_without_keys(
    tmp_path: Path, short_run_dir: Path
) -> None:
    settings = make_settings(tmp_path, short_run_dir)
    journal = Journal(settings.messages_db, source="test")
    try:
        with pytest.raises(ConfigError, match="endpoint consumer=tcp://10.1.0.2:5551 is not"):
            BusNode(CONSUMER, BusConfig.of(settings), journal,
                    TOPOLOGY.with_endpoints({CONSUMER: "tcp://10.1.0.2:5551"}))
    finally:
        journal.close()


def _until(predicate: Any, timeout_s: float, tick: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        tick()


def test_processes_listen_where_trinity_endpoints_says(
    tmp_path: Path, short_run_dir: Path, keys_dir: Path
) -> None:
    """The controller publishes telemetry to WITNESS at its configured endpoint, over CURVE."""
    where = f"ipc://{short_run_dir}/elsewhere.sock"
    settings = Settings.from_env(_env(tmp_path, TRINITY_RUN_DIR=str(short_run_dir),
                                      TRINITY_ENDPOINTS=f"witness={where}",
                                      TRINITY_CURVE_DIR=str(keys_dir)))
    journal = Journal(settings.messages_db, source="test")
    witness = BusNode("witness", BusConfig.of(settings), journal, TRINITY_TOPOLOGY, publishes=())
    controller = BusNode("controller", BusConfig.of(settings), journal, TRINITY_TOPOLOGY,
                         publishes=(TELEMETRY,))
    try:
        assert witness.endpoint == where
        assert witness.topology.endpoint("witness", short_run_dir) == where
        assert controller.topology.endpoint("witness", short_run_dir) == where
        assert not (short_run_dir / "witness.sock").exists()
        got: list[Message] = []
        sent = controller.publish(TELEMETRY, {"n": 1})
        assert sent is not None

        def tick() -> None:
            controller.send([sent])  # again until the wire is up: copies count as duplicates
            witness.receive(20)
            witness.drain(lambda msg, tx: got.append(msg))
        _until(lambda: witness.counters.received >= 1, 10, tick)
        assert [m.json() for m in got] == [{"n": 1}]
    finally:
        controller.close()
        witness.close()
        journal.close()


# -- rejection of clients that are not ours --------------------------------------------


class _Watched:
    """A raw PUB socket and its handshake events."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket()
        self.events: set[int] = set()
        self.sent = 0

    def forge(self, seq: int) -> None:
        msg = Message(ALPHA, seq, f"rogue-{self.sent}", PUBLISHER, now_ms(), b'{"i": -1}')
        self.sock.send_multipart(msg.frames())
        self.sent += 1
        while self.monitor.poll(0):
            self.events.add(int(recv_monitor_message(self.monitor)["event"]))

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def _rogues(ctx: zmq.Context[Any], endpoint: str, keys_dir: Path,
            stranger: Path) -> tuple[_Watched, _Watched]:
    plain = _Watched(ctx)  # no CURVE at all
    plain.sock.connect(endpoint)
    unknown = _Watched(ctx)  # CURVE, the right server key, a client key nobody admitted
    public, secret = zmq.auth.load_certificate(
        stranger / curve.PRIVATE_DIR / f"{PUBLISHER}.key_secret")
    assert secret is not None
    unknown.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    unknown.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    unknown.sock.setsockopt(zmq.CURVE_SERVERKEY, curve.BusKeys.load(keys_dir, CONSUMER).public)
    unknown.sock.connect(endpoint)
    return plain, unknown


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:*", "ipc"])
def test_only_authenticated_clients_reach_a_curve_node(
    tmp_path: Path, short_run_dir: Path, keys_dir: Path, bind: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    stranger = tmp_path / "stranger"
    curve.generate(stranger, [PUBLISHER])
    settings = make_settings(tmp_path, short_run_dir, curve_dir=keys_dir)
    journal = Journal(settings.messages_db, source="consumer")
    journal.conn.execute(APPLIED_DDL)
    topology = TOPOLOGY if bind == "ipc" else TOPOLOGY.with_endpoints({CONSUMER: bind})
    consumer_ctx: zmq.Context[Any] = zmq.Context()
    publisher_ctx: zmq.Context[Any] = zmq.Context()  # another process, as far as ZeroMQ goes
    consumer = BusNode(CONSUMER, BusConfig.of(settings), journal, topology, context=consumer_ctx)
    bound = topology.with_endpoints({CONSUMER: consumer.endpoint})
    pub_journal = Journal(settings.messages_db, source="publisher")
    publisher = BusNode(PUBLISHER, BusConfig.of(settings), pub_journal, bound,
                        publishes=(ALPHA, BEATS), context=publisher_ctx)
    rogue_ctx: zmq.Context[Any] = zmq.Context()
    plain, unknown = _rogues(rogue_ctx, consumer.endpoint, keys_dir, stranger)
    total = 40
    try:
        caplog.set_level(logging.WARNING, logger="trinity.bus.curve")

        def tick() -> None:
            if publisher.counters.published < total:
                publisher.publish(ALPHA, {"i": publisher.counters.published})
            for rogue in (plain, unknown):
                rogue.forge(seq=rogue.sent + 1)  # next seq: would be applied if trusted
                rogue.forge(seq=total + 1000)  # beyond the journal: would be dead-lettered
            consumer.receive(20)
            consumer.drain(record_applied)
        _until(lambda: consumer.counters.applied >= total and plain.events and unknown.events,
               20, tick)
        deadline = time.monotonic() + 0.5  # and some more of the rogues' traffic
        while time.monotonic() < deadline:
            tick()
    finally:
        plain.close()
        unknown.close()
        rogue_ctx.destroy(linger=0)
        publisher.close()
        consumer.close()
        consumer_ctx.destroy(linger=0)
        publisher_ctx.destroy(linger=0)
    applied = applied_rows(settings.messages_db)
    dead = journal.dead_letters()
    pub_journal.close()
    journal.close()

    assert [idx for _, _, _, idx in applied] == list(range(total))
    assert plain.sent > 50 and unknown.sent > 50
    assert dead == []  # a forged message that reached the node would be dead-lettered here
    assert consumer.counters.dead_lettered == 0
    assert consumer.counters.received <= total  # live messages: the publisher's only
    # Both rogues got as far as the handshake, and no further.
    assert plain.events & HANDSHAKE_FAILED and zmq.EVENT_HANDSHAKE_SUCCEEDED not in plain.events
    assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in unknown.events
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in unknown.events
    stranger_key = zmq.auth.load_certificate(
        stranger / curve.PUBLIC_DIR / f"{PUBLISHER}.key")[0].decode()
    refused = [r.getMessage() for r in caplog.records if "unknown CURVE key" in r.getMessage()]
    assert refused == [f"refused a bus client with an unknown CURVE key {stranger_key}"]


def test_without_keys_the_same_forgeries_do_reach_the_node(
    tmp_path: Path, short_run_dir: Path
) -> None:
    """The control for the test above: its method sees a rogue client that gets through."""
    settings = make_settings(tmp_path, short_run_dir)
    journal = Journal(settings.messages_db, source="consumer")
    ctx: zmq.Context[Any] = zmq.Context()
    consumer = BusNode(CONSUMER, BusConfig.of(settings), journal,
                       TOPOLOGY.with_endpoints({CONSUMER: "tcp://127.0.0.1:*"}), context=ctx)
    plain = _Watched(ctx)
    plain.sock.connect(consumer.endpoint)
    try:
        def tick() -> None:
            plain.forge(seq=1000)
            consumer.receive(20)
            consumer.drain(record_applied)
        _until(lambda: consumer.counters.dead_lettered > 0, 10, tick)
        dead = journal.dead_letters()
    finally:
        plain.close()
        consumer.close()
        ctx.destroy(linger=0)
        journal.close()
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED in plain.events
    assert dead and all("is not in the journal" in d.reason for d in dead)


def test_the_zap_handler_is_one_thread_per_context_and_stops_with_its_last_node(
    tmp_path: Path, short_run_dir: Path, keys_dir: Path
) -> None:
    settings = make_settings(tmp_path, short_run_dir, curve_dir=keys_dir)
    journal = Journal(settings.messages_db, source="test")
    ctx: zmq.Context[Any] = zmq.Context()
    before = threading.active_count()
    witness = BusNode("witness", BusConfig.of(settings), journal, TRINITY_TOPOLOGY, context=ctx)
    architect = BusNode("architect", BusConfig.of(settings), journal, TRINITY_TOPOLOGY, context=ctx)
    try:
        assert threading.active_count() == before + 1
    finally:
        witness.close()
        assert threading.active_count() == before + 1
        architect.close()
        ctx.destroy(linger=0)
        journal.close()
    assert threading.active_count() == before
