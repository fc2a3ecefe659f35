"""ZeroMQ CURVE on the bus: who may put a message on a process's inbound socket.

One key pair per process (witness, architect, executor, controller), not one shared
pair. A process's pair serves both of its roles: its SUB socket (it binds) is a CURVE
server with that secret key, and its PUB socket (it connects) is a CURVE client with
it, given each peer's public key as that connection's server key. Every SUB socket
admits only clients whose public key is in ``public_keys/``: a ZAP handler checks it
(one per process, see :func:`start_authenticator`), and the socket refuses to work
without that handler (``ZAP_ENFORCE_DOMAIN``), so a missing handler fails closed.

Why one pair per process: when agents run on other hosts (or network namespaces),
each host needs ``public_keys/`` and only its own process's secret key
(``private_keys/<name>.key_secret``). A leaked host then gives away one identity,
taken back by deleting that one public key and restarting the others; with one
shared pair every host would hold every identity, and a server's key would not
prove which process a publisher reached.

Keys apply to every socket once configured, ``ipc://`` ones included: a connection
on the bus is then always encrypted and authenticated, whatever the endpoint, so a
topology that mixes ipc and tcp needs no rule per endpoint, and a test on loopback
runs the same code as a deployment across hosts.

Layout written by :func:`generate` (``trinity keys generate``)::

    <dir>/                                  0700
    <dir>/public_keys/<name>.key            0644  (public key only)
    <dir>/private_keys/<name>.key_secret    0600  (public and secret key)

An unauthenticated client (no CURVE, or a key not in ``public_keys/``) fails the
handshake: its messages never reach the socket, so nothing of it is applied,
journaled or dead-lettered. Denied keys are logged once each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from trinity.errors import ConfigError

log = logging.getLogger(__name__)

PUBLIC_DIR = "public_keys"
PRIVATE_DIR = "private_keys"
ZAP_DOMAIN = b"trinity"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
# Distinct denied keys logged per process; past this a client cycling keys is not
# allowed to fill the log.
_MAX_LOGGED_DENIALS = 100


def _hint(directory: Path) -> str:
    return f"run `trinity keys generate --dir {directory}`"


def check_keys_dir(directory: Path) -> None:
    """The folder holds public keys and a private folder only its owner can read."""
    public = directory / PUBLIC_DIR
    private = directory / PRIVATE_DIR
    if not public.is_dir() or not any(public.glob(f"*{PUBLIC_SUFFIX}")):
        raise ConfigError(f"CURVE key folder {directory} holds no public keys "
                          f"({PUBLIC_DIR}/*{PUBLIC_SUFFIX}); {_hint(directory)}")
    if not private.is_dir():
        raise ConfigError(f"CURVE key folder {directory} has no {PRIVATE_DIR}/; "
                          f"{_hint(directory)}")
    mode = private.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{private} is readable by others (mode {mode:o}): secret keys "
                          f"must be the owner's only; chmod 700 {private}")


def generate(directory: Path, names: Iterable[str], *, force: bool = False) -> list[Path]:
    """Write one key pair per process name; returns the secret key files.

    Refuses a folder that already holds keys unless ``force``: new keys lock out every
    process still holding the old ones. With ``force`` the old keys are removed first,
    so no old identity stays admitted.
    """
    public = directory / PUBLIC_DIR
    private = directory / PRIVATE_DIR
    existing = [p for d in (public, private) if d.is_dir() for p in d.iterdir()]
    if existing and not force:
        raise ConfigError(f"{directory} already holds CURVE keys; --force replaces them "
                          "(then restart every process, on every host, with the new keys)")
    import zmq.auth

    with _private_umask():
        for folder in (directory, public, private):
            if folder in (public, private) and folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        secrets = []
        for name in sorted(set(names)):
            public_file, secret_file = zmq.auth.create_certificates(private, name)
            moved = Path(shutil.move(public_file, public / Path(public_file).name))
            moved.chmod(0o644)
            Path(secret_file).chmod(0o600)
            secrets.append(Path(secret_file))
    return secrets


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files created inside are the owner's from their first byte."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@dataclass(frozen=True)
class BusKeys:
    """One process's key pair and the public keys of everyone it may talk to."""

    name: str
    directory: Path
    public: bytes
    secret: bytes
    peers: Mapping[str, bytes]  # process name -> public key (z85)

    @classmethod
    def load(cls, directory: Path, name: str) -> BusKeys:
        import zmq.auth

        check_keys_dir(directory)
        secret_file = directory / PRIVATE_DIR / f"{name}{SECRET_SUFFIX}"
        if not secret_file.is_file():
            raise ConfigError(
                f"no CURVE secret key for {name!r} ({secret_file}); copy it from the "
                f"machine that ran `trinity keys generate`, or {_hint(directory)}")
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
            peers = {path.name[:-len(PUBLIC_SUFFIX)]: zmq.auth.load_certificate(path)[0]
                     for path in (directory / PUBLIC_DIR).glob(f"*{PUBLIC_SUFFIX}")}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable CURVE key in {directory}: {exc}") from None
        if secret is None:
            raise ConfigError(f"{secret_file} holds no secret key; {_hint(directory)}")
        return cls(name, directory, public, secret, peers)

    def server_key(self, peer: str) -> bytes:
        try:
            return self.peers[peer]
        except KeyError:
            raise ConfigError(f"no CURVE public key for {peer!r} in "
                              f"{self.directory / PUBLIC_DIR}; {_hint(self.directory)}") from None

    @property
    def admitted(self) -> frozenset[bytes]:
        return frozenset(self.peers.values())


def serve(sock: zmq.Socket[Any], keys: BusKeys) -> None:
    """Make ``sock`` a CURVE server admitting only known clients (call before bind)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def connect(sock: zmq.Socket[Any], keys: BusKeys, peer: str, endpoint: str) -> None:
    """Connect ``sock`` to ``peer`` as a CURVE client; each connection takes the server
    key set at its connect, so one PUB socket reaches every peer with its own key."""
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key(peer))
    sock.connect(endpoint)


class _Gatekeeper:
    """ZAP credentials callback: a client key is admitted if it is a known public key."""

    def __init__(self, admitted: frozenset[bytes]) -> None:
        self.admitted = admitted
        self.denied: set[bytes] = set()

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.admitted:
            return True
        if client_key not in self.denied and len(self.denied) < _MAX_LOGGED_DENIALS:
            self.denied.add(client_key)
            log.warning("refused a bus client with an unknown CURVE key %s",
                        client_key.decode("ascii", "replace"))
        return False


@dataclass
class _Running:
    authenticator: Any  # zmq.auth.thread.ThreadAuthenticator
    directory: Path
    users: int


_lock = threading.Lock()
_running: dict[int, _Running] = {}


def start_authenticator(ctx: zmq.Context[Any], keys: BusKeys) -> None:
    """Start the ZAP handler of ``ctx`` (a thread; one per context, shared by its sockets)."""
    from zmq.auth.thread import ThreadAuthenticator

    with _lock:
        running = _running.get(id(ctx))
        if running is not None:
            if running.directory != keys.directory:
                raise ConfigError(f"one process, one CURVE key folder: {running.directory} "
                                  f"is in use, not {keys.directory}")
            running.users += 1
            return
        authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("trinity.bus.zap"))
        authenticator.start()
        authenticator.configure_curve_callback(
            domain=ZAP_DOMAIN.decode(), credentials_provider=_Gatekeeper(keys.admitted))
        _running[id(ctx)] = _Running(authenticator, keys.directory, 1)


def stop_authenticator(ctx: zmq.Context[Any]) -> None:
    """The last user of ``ctx``'s ZAP handler stops its thread."""
    with _lock:
        running = _running.get(id(ctx))
        if running is None:
            return
        running.users -= 1
        if running.users > 0:
            return
        del _running[id(ctx)]
    running.authenticator.stop()
