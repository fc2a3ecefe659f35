"""What the bus needs to know, and nothing more: where sockets go, the limits, the keys.

A :class:`BusConfig` is built from the settings (:meth:`BusConfig.of`) or by hand (tests,
benchmarks). The bus knows no process names: which streams exist and who consumes them
is the topology a node is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from trinity.endpoints import require_keys_off_loopback
from trinity.settings import Settings


@dataclass(frozen=True)
class BusConfig:
    # Where ipc sockets are made (kept short: unix socket paths are limited to ~107 bytes).
    run_dir: Path
    # How often a consumer looks at the journal head when no live message woke it.
    poll_interval_s: float = 0.2
    # Payloads over this are refused at publish and dead-lettered at receipt.
    max_payload_bytes: int = 1 << 20
    # Journal rows applied per transaction.
    batch_size: int = 500
    # Where a process listens instead of its ipc socket, by process name.
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The folder of ZeroMQ CURVE keys; every socket uses them when it is set.
    curve_dir: Path | None = None

    @classmethod
    def of(cls, settings: Settings) -> BusConfig:
        return cls(run_dir=settings.run_dir, poll_interval_s=settings.poll_interval_s,
                   max_payload_bytes=settings.max_payload_bytes, batch_size=settings.batch_size,
                   endpoints=settings.endpoints, curve_dir=settings.curve_dir)

    def check(self) -> None:
        """ConfigError unless a process could open its sockets with this config: an
        endpoint off loopback needs keys, and a key folder must hold keys that only its
        owner can read. ``trinity run`` asks this before anything starts."""
        from trinity.bus import curve

        require_keys_off_loopback(self.endpoints, have_keys=self.curve_dir is not None)
        if self.curve_dir is not None:
            curve.check_keys_dir(self.curve_dir)
