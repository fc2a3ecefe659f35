"""Trinity across hosts: each process in a network namespace of its own, CURVE on the wire.

Five namespaces stand for five hosts on one network: the controller, WITNESS, ARCHITECT and
EXECUTOR, each binding its bus socket on its own ``10.77.0.x`` address (``TRINITY_ENDPOINTS``),
and a probe host that holds no key. A sixth namespace is the switch: a bridge with one veth
to each host. Every host has ``public_keys/`` and only its own secret key, as
``trinity keys generate`` tells a deployment to copy them. supervisord and crashwatch stay
in the root namespace; each program runs as ``ip netns exec <host> trinity ...`` (which
execs, so supervisord's pid is the program's). The stores are one folder all hosts share
(SQLite on the same filesystem): consumers apply from the journal, the wire carries the
hints that wake them and the heartbeats, which exist only on the wire.

The run: each process listens only on its host's address, a client from the probe host
reaches WITNESS's port but fails the CURVE handshake; then ARCHITECT's link is cut at the
switch (``ip link set v-architect down``) for 25 s, far past the heartbeat deadline, and
restored. The controller must report ARCHITECT silent during the cut and recovered after
it (and no other agent); every connection over the link must be new within a few seconds
of the restore (WITNESS's to ARCHITECT too, whose connect was left hanging on the kernel's
SYN retransmissions, 14.6 s late, before the bus set a connect timeout); the backlogs drain
to 0, the run completes and the audit of the stores finds every event with exactly one
outcome, nothing lost or done twice.

Self-healing is off here (``TRINITY_RESTART_INTENSITY=0``). A cut link is not a hung
process: ARCHITECT goes on applying from the journal the whole time, and a restart cannot
bring a cable back. With healing on, the controller restarted it 15 s into this 25 s cut (a
silent process asleep in a system call counts as hung 12 s past the deadline): its model
call in flight thrown away, and the new process as silent as the old one until the link
returned; a longer cut would restart it again each startup grace until the restart
intensity is spent and a critical ``restart_intensity_exceeded`` alert blames a healthy
agent for the network. What this test asserts is what the controller can rightly say of a
partition: silent, then recovered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from tests.bus.test_curve import HANDSHAKE_FAILED
from tests.conftest import BIN, ROOT, Project, wait_for
from trinity.bus import curve
from trinity.clock import now_ms
from trinity.controller.ops.audit import audit_run
from trinity.db import open_readonly
from trinity.settings import CURVE_DIR_NAME, Settings
from trinity.stores.run_logs import read_alerts

PREFIX = "trmh"  # namespaces are PREFIX<pid of the test process>-<host>
SUBNET = "10.77.0"
# host -> (last byte of its address, its bus port); the probe binds nothing.
HOSTS = {"controller": (1, 5550), "witness": (2, 5551), "architect": (3, 5552),
         "executor": (4, 5553)}
PROBE = ("probe", 9)
SWITCH = "switch"
CUT = "architect"  # the host whose link is cut
PROGRAM_COMMANDS = {host: "trinity controller" if host == "controller" else f"trinity agent {host}"
                    for host in HOSTS}
# A run that outlasts the cut: 8 events 5 s apart, 16 model calls on the embedded model.
RUN_ARGS = ("--duration", "4", "--time-scale", "360")
EVENTS = 8
HEARTBEAT_INTERVAL_S = 1.0
MAX_MISSED = 3
DEADLINE_S = HEARTBEAT_INTERVAL_S * MAX_MISSED
# Long past the deadline and ZeroMQ's 3 s heartbeat timeout (which drops the connections),
# and long enough for the kernel's SYN retransmissions of a pending connect to be 16 s apart.
CUT_S = 25.0
# Connections over the link are new within this after the restore (ZeroMQ's connect timeout
# plus its longest reconnect interval, 2 s each, and a margin).
RECONNECT_S = 6.0
# The connections through ARCHITECT's link: (publisher, consumer).
LINKS = (("witness", "architect"), ("architect", "controller"), ("architect", "executor"))

# Run from the probe host: a plain ZeroMQ client (no CURVE) sends well-formed messages
# that WITNESS would apply or dead-letter if they got through, and prints the socket's
# handshake events.
PROBE_SCRIPT = """
import json, sys, time, zmq
from zmq.utils.monitor import recv_monitor_message
from trinity.bus.message import Message
from trinity.clock import now_ms
ctx = zmq.Context()
sock = ctx.socket(zmq.PUB)
sock.setsockopt(zmq.LINGER, 0)
monitor = sock.get_monitor_socket()
sock.connect(sys.argv[1])
events, sent = set(), 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    for seq in (1, 10**6):  # one the journal has, one far beyond it
        msg = Message("telemetry_stream", seq, f"rogue-{sent}", "controller", now_ms(), b"{}")
        sock.send_multipart(msg.frames())
        sent += 1
    while monitor.poll(20):
        events.add(int(recv_monitor_message(monitor)["event"]))
print(json.dumps({"events": sorted(events), "sent": sent}))
"""


def _ip_binary() -> str | None:
    return shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


IP = _ip_binary() or "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def remove_stale_namespaces() -> list[str]:
    """Namespaces of an earlier run of this test whose process is gone (killed mid-run)."""
    removed = []
    for name in _namespaces():
        found = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if found and int(found[1]) != os.getpid() and not psutil.pid_exists(int(found[1])):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Listener:
    address: str
    pids: tuple[int, ...]


@dataclass
class Network:
    """The hosts and the switch; every name in it carries this test process's pid."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    created: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    @staticmethod
    def address(host: str) -> str:
        last = PROBE[1] if host == PROBE[0] else HOSTS[host][0]
        return f"{SUBNET}.{last}"

    @staticmethod
    def endpoint(host: str) -> str:
        return f"tcp://{Network.address(host)}:{HOSTS[host][1]}"

    @staticmethod
    def veth(host: str) -> str:
        """The switch's end of ``host``'s link (the host's own end is ``eth0``)."""
        return f"v-{host}"

    def build(self) -> None:
        switch = self.ns(SWITCH)
        self._add(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for host in (*HOSTS, PROBE[0]):
            ns = self.ns(host)
            self._add(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", self.veth(host), "netns", switch)
            _ip("-n", switch, "link", "set", self.veth(host), "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)

    def teardown(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()

    def set_link(self, host: str, up: bool) -> int:
        """Bring ``host``'s link at the switch down or up; returns the time (ms)."""
        _ip("-n", self.ns(SWITCH), "link", "set", self.veth(host), "up" if up else "down")
        return now_ms()

    def exec(self, host: str, *argv: str, timeout: float = 30) -> str:
        result = subprocess.run([IP, "netns", "exec", self.ns(host), *argv],
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def listeners(self, host: str) -> list[Listener]:
        return [Listener(parts[3], tuple(int(p) for p in re.findall(r"pid=(\d+)", line)))
                for line in self.exec(host, "ss", "-ltnpH").splitlines()
                if len(parts := line.split()) >= 4]

    def established(self, host: str) -> set[tuple[str, str]]:
        """(local, peer) of the host's established TCP connections."""
        return {(parts[2], parts[3]) for line in
                self.exec(host, "ss", "-tnH", "state", "established").splitlines()
                if len(parts := line.split()) >= 4}


def _netns_unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces are needed in CI: {reason}")
    pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture
def network() -> Iterator[Network]:
    if _ip_binary() is None:
        _netns_unavailable("no `ip` command (iproute2)")
    remove_stale_namespaces()
    net = Network()
    try:
        try:
            net.build()
        except RuntimeError as exc:
            _netns_unavailable(str(exc))
        yield net
    finally:
        net.teardown()
    assert not [ns for ns in _namespaces() if ns.startswith(f"{net.tag}-")]


def host_keys(project: Project, host: str) -> Path:
    """What a host holds: every public key and only its own process's secret key."""
    generated = project.root / CURVE_DIR_NAME
    folder = project.root / "hosts" / host / CURVE_DIR_NAME
    shutil.copytree(generated / curve.PUBLIC_DIR, folder / curve.PUBLIC_DIR)
    private = folder / curve.PRIVATE_DIR
    private.mkdir(mode=0o700)
    secret = f"{host}.key_secret"
    shutil.copy2(generated / curve.PRIVATE_DIR / secret, private / secret)
    folder.chmod(0o700)
    return folder


def supervisor_conf(network: Network, keys: dict[str, Path]) -> str:
    """The repo's supervisor.conf with each program run on its host."""
    text = (ROOT / "supervisor.conf").read_text(encoding="utf-8")
    for host, command in PROGRAM_COMMANDS.items():
        line = f"command={command}\n"
        assert text.count(line) == 1, f"supervisor.conf has no single {line!r}"
        # A program's own environment line (the model agents' TRINITY_MODEL_SERVER) is
        # kept beside the host's keys: supervisord takes one environment line a program.
        found = re.search(re.escape(line) + r"(environment=(.*)\n)?", text)
        assert found is not None
        own = f",{found.group(2)}" if found.group(2) else ""
        text = text.replace(found.group(0),
                            f"command={IP} netns exec {network.ns(host)} {command}\n"
                            f'environment=TRINITY_CURVE_DIR="{keys[host]}"{own}\n')
    return text


def _pids(project: Project) -> dict[str, int]:
    return {p["name"]: int(p["pid"]) for p in project.supervisor().process_info()}


def _alerts(project: Project, kind: str) -> list[dict[str, Any]]:
    return [a for a in read_alerts(project.alerts_log) if a.get("kind") == kind]


@dataclass
class Backlogs:
    """Queue backlogs (head minus cursor, per stream and consumer), sampled from the journal."""

    db: Path
    peak: dict[str, int] = field(default_factory=dict)

    def sample(self) -> dict[str, int]:
        try:
            conn = open_readonly(self.db)
        except sqlite3.Error:
            return {}
        try:
            rows = conn.execute(
                "SELECT s.stream, c.consumer, s.head - c.seq FROM streams s"
                " JOIN cursors c ON c.stream = s.stream").fetchall()
        except sqlite3.Error:
            return {}
        finally:
            conn.close()
        now = {f"{stream}/{consumer}": int(pending) for stream, consumer, pending in rows}
        for queue, pending in now.items():
            self.peak[queue] = max(self.peak.get(queue, 0), pending)
        return now


def _count(db: Path, sql: str, *params: object) -> int:
    conn = open_readonly(db)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


def _while_sampling(backlogs: Backlogs, predicate: Callable[[], object]) -> Callable[[], object]:
    def check() -> object:
        backlogs.sample()
        return predicate()
    return check


def probe(network: Network, target: str, seconds: float = 2.0) -> dict[str, Any]:
    """A plain client on the probe host sends to ``target``'s socket; its handshake events."""
    out = network.exec(PROBE[0], sys.executable, "-c", PROBE_SCRIPT, Network.endpoint(target),
                       str(seconds))
    result: dict[str, Any] = json.loads(out)
    return result


def _links(network: Network) -> dict[tuple[str, str], set[str]]:
    """Local addresses of the established connections over the cut link, per (publisher,
    consumer): each PUB socket connects to its consumer's endpoint."""
    found: dict[tuple[str, str], set[str]] = {}
    for publisher, consumer in LINKS:
        target = Network.endpoint(consumer)[len("tcp://"):]
        found[(publisher, consumer)] = {local for local, peer in network.established(publisher)
                                        if peer == target}
    return found


def _all_linked(network: Network) -> dict[tuple[str, str], set[str]] | None:
    links = _links(network)
    return links if all(links.values()) else None


def test_stale_namespaces_of_a_killed_run_are_removed(network: Network) -> None:
    """A namespace left by a test process that is gone goes; a live process's stays."""
    child = subprocess.Popen(["true"])
    child.wait()
    stale = f"{PREFIX}{child.pid}-{SWITCH}"
    if psutil.pid_exists(child.pid):
        pytest.skip(f"pid {child.pid} was reused at once")
    _ip("netns", "add", stale)
    try:
        assert stale in remove_stale_namespaces()
        assert stale not in _namespaces()
        assert network.ns(SWITCH) in _namespaces()  # this run's own
    finally:
        _ip("netns", "del", stale, check=False)


@pytest.mark.timeout(300)
def test_hosts_in_namespaces_survive_a_cut_link(network: Network, project: Project) -> None:
    generated = project.trinity("keys", "generate")
    assert generated.returncode == 0, generated.stderr
    keys = {host: host_keys(project, host) for host in HOSTS}
    project.config.write_text(supervisor_conf(network, keys), encoding="utf-8")
    project.env.update({
        "TRINITY_ENDPOINTS": ",".join(f"{h}={Network.endpoint(h)}" for h in HOSTS),
        "TRINITY_RESTART_INTENSITY": "0",
        "TRINITY_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL_S),
        "TRINITY_HEARTBEAT_MAX_MISSED": str(MAX_MISSED),
    })
    settings = Settings.from_env(project.env)
    backlogs = Backlogs(project.db)
    started = time.monotonic()
    run = subprocess.Popen([str(BIN / "trinity"), "run", *RUN_ARGS], cwd=project.root,
                           env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        wait_for(lambda: project.db.exists() and _count(
            project.db, "SELECT count(*) FROM sqlite_master WHERE name='agents'"), 60,
            "the controller's agents table")
        wait_for(lambda: _count(project.db, "SELECT count(*) FROM agents") == 3, 60,
                 "heartbeats of all three agents, over CURVE across the namespaces")
        beating_s = time.monotonic() - started
        pids = _pids(project)

        # Each process listens on its own host's address and nowhere else.
        for host, (_, port) in HOSTS.items():
            assert network.listeners(host) == [
                Listener(f"{Network.address(host)}:{port}", (pids[host],))], host
        root_ports = {line.split()[3].rpartition(":")[2] for line in subprocess.run(
            ["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()}
        assert not root_ports & {str(port) for _, port in HOSTS.values()}

        # A client on the network without a key reaches WITNESS's port, and no further.
        rogue = probe(network, "witness")
        assert zmq.EVENT_CONNECTED in rogue["events"], rogue
        assert set(rogue["events"]) & HANDSHAKE_FAILED, rogue
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in rogue["events"], rogue

        before = wait_for(lambda: _all_linked(network), 10,
                          "every connection over ARCHITECT's link")
        assert isinstance(before, dict)

        # Cut ARCHITECT's link, long past the heartbeat deadline, then restore it.
        cut_ms = network.set_link(CUT, up=False)
        cut_at = time.monotonic()
        silent = wait_for(_while_sampling(backlogs, lambda: _alerts(project, "agent_silent")),
                          DEADLINE_S + 3, f"an agent_silent alert within {DEADLINE_S + 3} s")
        during_cut = backlogs.sample()
        wait_for(_while_sampling(backlogs, lambda: time.monotonic() - cut_at >= CUT_S),
                 CUT_S + 1, "the end of the cut")
        outcomes_during_cut = _count(
            project.db, "SELECT count(*) FROM outcomes WHERE recorded_ms >= ?", cut_ms)
        assert _count(project.db, "SELECT count(*) FROM runs WHERE status='active'") == 1
        restored_ms = network.set_link(CUT, up=True)
        restored_at = time.monotonic()
        recovered = wait_for(
            _while_sampling(backlogs, lambda: _alerts(project, "agent_recovered")), 20,
            "the agent_recovered alert after the link came back")
        # ZeroMQ connected again (new connections) over the link, both ways.
        reconnected_s: dict[tuple[str, str], float] = {}

        def all_reconnected() -> bool:
            backlogs.sample()
            for link, local in _links(network).items():
                if link not in reconnected_s and local - before[link]:
                    reconnected_s[link] = time.monotonic() - restored_at
            return len(reconnected_s) == len(LINKS)

        wait_for(all_reconnected, 60, "new connections over ARCHITECT's link")
        assert _count(project.db, "SELECT count(*) FROM runs WHERE status='active'") == 1

        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    wall_s = time.monotonic() - started
    assert run.returncode == 0, out

    assert isinstance(silent, list) and isinstance(recovered, list)
    assert [a["agent"] for a in _alerts(project, "agent_silent")] == [CUT]
    assert [a["agent"] for a in _alerts(project, "agent_recovered")] == [CUT]
    silent_ms, recovered_ms = int(silent[0]["ts_ms"]), int(recovered[0]["ts_ms"])
    assert cut_ms < silent_ms < restored_ms
    assert restored_ms < recovered_ms <= restored_ms + RECONNECT_S * 1000
    # Not left to the kernel's SYN retransmissions, seconds apart after a long cut.
    assert max(reconnected_s.values()) <= RECONNECT_S, reconnected_s
    assert not _alerts(project, "agent_crashed")
    assert not _alerts(project, "agent_restarted")

    audit = audit_run(settings, _run_id(project))
    assert audit.passed, "\n".join(audit.lines())
    assert audit.events_emitted == EVENTS
    assert audit.events_with_outcome == audit.events_emitted
    assert audit.dead_letters == 0  # the probe's forgeries never reached WITNESS
    final = backlogs.sample()
    assert final and set(final.values()) == {0}, final
    assert _count(project.db, "SELECT count(*) FROM runs WHERE status='completed'") == 1

    print(f"\nall agents beating {beating_s:.1f} s after start; ARCHITECT's link cut for "
          f"{(restored_ms - cut_ms) / 1000:.1f} s: agent_silent {(silent_ms - cut_ms) / 1000:.2f} s"
          f" after the cut, agent_recovered {(recovered_ms - restored_ms) / 1000:.2f} s after "
          f"the restore; reconnected after the restore: "
          + ", ".join(f"{a}->{b} {s:.1f} s" for (a, b), s in sorted(reconnected_s.items()))
          + f"; backlogs at the silent alert {during_cut}, peaks {backlogs.peak}, at the end "
          f"{final}; {outcomes_during_cut} outcomes recorded during the cut; "
          f"{audit.events_emitted} events, {audit.outcomes_recorded} outcomes "
          f"({audit.task_outcomes} task outcomes), audit {'PASSED' if audit.passed else 'FAILED'};"
          f" probe sent {rogue['sent']} forged messages; run {wall_s:.0f} s")


def _run_id(project: Project) -> str:
    conn = open_readonly(project.db)
    try:
        return str(conn.execute("SELECT run_id FROM runs").fetchone()[0])
    finally:
        conn.close()
