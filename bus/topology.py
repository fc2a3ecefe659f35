"""Who consumes which stream, and where each process listens.

Every process that consumes something binds one SUB socket (its inbound
endpoint); publishers connect their PUB socket to the inbound endpoints of the
consumers of the streams they publish. ``ephemeral`` streams (heartbeats) are
sent but never journaled.
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


def _check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        return
    if not endpoint.startswith("tcp://"):
        raise ConfigError(f"endpoint {endpoint!r}: only ipc:// and tcp:// are supported")
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"endpoint {endpoint!r} is not on loopback; non-loopback endpoints need CURVE keys"
        )


@dataclass(frozen=True)
class Topology:
    consumers: Mapping[str, tuple[str, ...]]
    ephemeral: frozenset[str] = frozenset()
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for endpoint in self.endpoints.values():
            _check_endpoint(endpoint)

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.consumers)

    def durable_streams(self) -> tuple[str, ...]:
        return tuple(s for s in self.consumers if s not in self.ephemeral)

    def consumed_by(self, name: str) -> tuple[str, ...]:
        """Durable streams ``name`` applies from the journal."""
        return tuple(s for s in self.durable_streams() if name in self.consumers[s])

    def listens(self, name: str) -> bool:
        return any(name in consumers for consumers in self.consumers.values())

    def peers_for(self, publishes: Iterable[str], exclude: str | None = None) -> tuple[str, ...]:
        names = {c for s in publishes for c in self.consumers.get(s, ())}
        names.discard(exclude or "")
        return tuple(sorted(names))

    def endpoint(self, name: str, run_dir: Path) -> str:
        return self.endpoints.get(name) or f"ipc://{run_dir}/{name}.sock"

    def with_endpoints(self, endpoints: Mapping[str, str]) -> Topology:
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
