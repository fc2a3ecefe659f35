"""Who consumes which stream, and where each process listens.

Every process that consumes something binds one SUB socket (its inbound
endpoint); publishers connect their PUB socket to the inbound endpoints of the
consumers of the streams they publish. ``ephemeral`` streams (heartbeats) are
sent but never journaled.

Each process listens on ``ipc://<run_dir>/<name>.sock`` unless given an endpoint
(``TRINITY_ENDPOINTS``, parsed by :func:`parse_endpoints`). An endpoint another machine
could reach is refused unless ZeroMQ CURVE keys are configured
(:func:`require_keys_off_loopback`; the keys themselves are ``bus/curve.py``'s).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from trinity.errors import ConfigError

TELEMETRY = "telemetry_stream"
IMPROVEMENT = "improvement_queue"
EXECUTION = "execution_queue"
ALERTS = "alerts"
HEARTBEATS = "heartbeats"


# Where keys come from, for the messages that ask for them.
KEYS_HINT = "run `trinity keys generate` (or set TRINITY_CURVE_DIR to a folder of keys)"


def check_endpoint(endpoint: str, *, any_port: bool = True) -> None:
    """``ipc://<path>`` or ``tcp://<host>:<port>``; port ``*`` (any free one, read back
    after the bind) only with ``any_port``: a peer cannot connect to ``*``."""
    if endpoint.startswith("ipc://"):
        if not endpoint[len("ipc://"):]:
            raise ConfigError(f"endpoint {endpoint!r} has no socket path")
        return
    if not endpoint.startswith("tcp://"):
        raise ConfigError(f"endpoint {endpoint!r}: only ipc:// and tcp:// are supported")
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if any_port and port == "*" and host.strip("[]"):
        return
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"endpoint {endpoint!r} is not tcp://<host>:<port> with a port "
                          "1..65535")


def is_loopback(endpoint: str) -> bool:
    """True for endpoints no other machine can reach: ``ipc://`` and loopback tcp."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name or an interface (``*``, ``eth0``): could be anything
        return False


def require_keys_off_loopback(endpoints: Mapping[str, str], have_keys: bool) -> None:
    """A non-loopback endpoint without CURVE keys would take anyone's messages: refused."""
    if have_keys:
        return
    for name, endpoint in sorted(endpoints.items()):
        if not is_loopback(endpoint):
            raise ConfigError(f"endpoint {name}={endpoint} is not on loopback and no ZeroMQ "
                              f"CURVE keys are configured; {KEYS_HINT}")


@dataclass(frozen=True)
class Topology:
    consumers: Mapping[str, tuple[str, ...]]
    ephemeral: frozenset[str] = frozenset()
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name, endpoint in self.endpoints.items():
            if not self.listens(name):
                raise ConfigError(f"endpoint for {name!r}: not a process of the topology "
                                  f"({', '.join(self.process_names)})")
            check_endpoint(endpoint)

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.consumers)

    def durable_streams(self) -> tuple[str, ...]:
        return tuple(s for s in self.consumers if s not in self.ephemeral)

    def consumed_by(self, name: str) -> tuple[str, ...]:
        """Durable streams ``name`` applies from the journal."""
        return tuple(s for s in self.durable_streams() if name in self.consumers[s])

    @property
    def process_names(self) -> tuple[str, ...]:
        """Every process that binds an inbound socket (all of Trinity's processes do)."""
        return tuple(sorted({c for consumers in self.consumers.values() for c in consumers}))

    def listens(self, name: str) -> bool:
        return any(name in consumers for consumers in self.consumers.values())

    def peers_for(self, publishes: Iterable[str], exclude: str | None = None) -> tuple[str, ...]:
        names = {c for s in publishes for c in self.consumers.get(s, ())}
        names.discard(exclude or "")
        return tuple(sorted(names))

    def endpoint(self, name: str, run_dir: Path) -> str:
        return self.endpoints.get(name) or f"ipc://{run_dir}/{name}.sock"

    def with_endpoints(self, endpoints: Mapping[str, str]) -> Topology:
        """This topology with ``endpoints`` in place of the ipc sockets (or earlier ones)."""
        if not endpoints:
            return self
        merged = {**self.endpoints, **endpoints}
        return Topology(self.consumers, self.ephemeral, MappingProxyType(merged))


DEFAULT_TOPOLOGY = Topology(
    consumers=MappingProxyType(
        {
            TELEMETRY: ("witness",),
            IMPROVEMENT: ("architect",),
            EXECUTION: ("executor",),
            ALERTS: ("controller",),
            HEARTBEATS: ("controller",),
        }
    ),
    ephemeral=frozenset({HEARTBEATS}),
)


def parse_endpoints(text: str, topology: Topology = DEFAULT_TOPOLOGY,
                    variable: str = "TRINITY_ENDPOINTS") -> dict[str, str]:
    """``name=endpoint,name=endpoint`` (e.g. ``witness=tcp://10.1.0.2:5551``), each name a
    process of ``topology``, each endpoint valid; a clear ConfigError otherwise."""
    endpoints: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, endpoint = (x.strip() for x in item.partition("="))
        if not sep or not name or not endpoint:
            raise ConfigError(f"{variable}: {item!r} is not name=endpoint "
                              "(e.g. witness=tcp://10.1.0.2:5551)")
        if not topology.listens(name):
            raise ConfigError(f"{variable}: {name!r} is not a process; the processes are "
                              f"{', '.join(topology.process_names)}")
        if name in endpoints:
            raise ConfigError(f"{variable}: {name!r} is given twice")
        try:
            check_endpoint(endpoint, any_port=False)
        except ConfigError as exc:
            raise ConfigError(f"{variable}: {exc}") from None
        endpoints[name] = endpoint
    return endpoints
