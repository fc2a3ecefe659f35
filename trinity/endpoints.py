"""Where a process listens: endpoint syntax, and which endpoints another machine can reach.

Each process listens on ``ipc://<run_dir>/<name>.sock`` unless given an endpoint
(``TRINITY_ENDPOINTS``, parsed by :func:`parse_endpoints`). An endpoint another machine
could reach is refused unless ZeroMQ CURVE keys are configured
(:func:`require_keys_off_loopback`; the keys themselves are ``bus/curve.py``'s).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping

from trinity.errors import ConfigError

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


def parse_endpoints(text: str, processes: Collection[str],
                    variable: str = "TRINITY_ENDPOINTS") -> dict[str, str]:
    """``name=endpoint,name=endpoint`` (e.g. ``witness=tcp://10.1.0.2:5551``), each name
    one of ``processes``, each endpoint valid; a clear ConfigError otherwise."""
    endpoints: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, endpoint = (x.strip() for x in item.partition("="))
        if not sep or not name or not endpoint:
            raise ConfigError(f"{variable}: {item!r} is not name=endpoint "
                              "(e.g. witness=tcp://10.1.0.2:5551)")
        if name not in processes:
            raise ConfigError(f"{variable}: {name!r} is not a process; the processes are "
                              f"{', '.join(sorted(processes))}")
        if name in endpoints:
            raise ConfigError(f"{variable}: {name!r} is given twice")
        try:
            check_endpoint(endpoint, any_port=False)
        except ConfigError as exc:
            raise ConfigError(f"{variable}: {exc}") from None
        endpoints[name] = endpoint
    return endpoints
