"""Starting, querying and stopping supervisord through its own XML-RPC interface.

The config's ``%(here)s`` paths make everything relative to the config file's
folder: the control socket in ``.run/``, program logs in ``logs/supervisor/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xmlrpc.client import Fault, ProtocolError, ServerProxy

import psutil
from supervisor import xmlrpc
from supervisor.options import ClientOptions

from trinity.contract import (
    CONTROLLER,
    CRASHWATCH,
    MODEL_SERVER_COMMAND,
    PROCESSES,
    PROGRAMS,
)
from trinity.errors import TrinityError

_OUR_COMMANDS = (("trinity", "agent"), ("trinity", CONTROLLER), ("trinity", CRASHWATCH),
                 ("trinity", MODEL_SERVER_COMMAND))


class SupervisorError(TrinityError):
    """supervisord could not be started, reached or stopped."""


_STOPPED_STATES = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")
_ALREADY_STARTED = 60  # supervisor.xmlrpc.Faults.ALREADY_STARTED


class SupervisorClient:
    """supervisord's XML-RPC API at ``serverurl`` (``unix:///path/to.sock`` or http)."""

    def __init__(self, serverurl: str) -> None:
        self.serverurl = serverurl
        self.socket_path = Path(self.serverurl.removeprefix("unix://"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SupervisorClient | None:
        """The supervisord this process runs under (it sets SUPERVISOR_SERVER_URL in its
        children's environment), or None when not started by supervisord."""
        url = (os.environ if env is None else env).get("SUPERVISOR_SERVER_URL", "").strip()
        return cls(url) if url else None

    def call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call on the ``supervisor`` namespace, on a connection of its own."""
        transport = xmlrpc.SupervisorTransport(None, None, serverurl=self.serverurl)
        try:
            proxy = ServerProxy("http://127.0.0.1", transport=transport)
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()

    def process(self, name: str) -> dict[str, Any]:
        """supervisord's getProcessInfo for program ``name``."""
        try:
            return dict(self.call("getProcessInfo", name))
        except (OSError, Fault, ProtocolError) as exc:
            raise SupervisorError(f"cannot ask supervisord about {name}: {exc}") from exc

    def restart_hung(self, name: str, timeout_s: float = 5.0) -> int:
        """Restart program ``name`` whose process is hung; returns the new pid.

        stopProcess first, so supervisord takes the exit for a requested stop (state
        STOPPED, no autorestart of its own, no PROCESS_STATE_EXITED for crashwatch);
        then SIGKILL at once, since a stopped or hung process never acts on the SIGTERM
        and supervisord would wait stopwaitsecs for it; then startProcess, without
        waiting for startsecs. A program already stopped (by an earlier attempt that
        failed half way) is only started.
        """
        try:
            if self.process(name)["statename"] not in _STOPPED_STATES:
                self.call("stopProcess", name, False)
                with contextlib.suppress(Fault):  # it may have gone on its own meanwhile
                    self.call("signalProcess", name, "KILL")
            deadline = time.monotonic() + timeout_s
            while self.process(name)["statename"] not in _STOPPED_STATES:
                if time.monotonic() > deadline:
                    raise SupervisorError(f"{name} still not stopped {timeout_s:g} s after "
                                          "SIGKILL")
                time.sleep(0.01)
            try:
                self.call("startProcess", name, False)
            except Fault as exc:  # it exited, and supervisord's autorestart was first
                if exc.faultCode != _ALREADY_STARTED:
                    raise
            return int(self.process(name)["pid"])
        except (OSError, Fault, ProtocolError) as exc:
            raise SupervisorError(f"cannot restart {name} through supervisord: {exc}") from exc

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return bool(self.call("getState")["statename"] == "RUNNING")
        except (OSError, Fault):
            return False

    def process_info(self) -> list[dict[str, Any]]:
        return list(self.call("getAllProcessInfo"))

    def states(self) -> dict[str, str]:
        return {p["name"]: p["statename"] for p in self.process_info()}


class Supervisor(SupervisorClient):
    """The supervisord of one project folder, from its config file: started, stopped and
    cleaned up after, as well as called."""

    def __init__(self, config: Path) -> None:
        self.config = config.resolve()
        if not self.config.is_file():
            raise SupervisorError(f"supervisor config {self.config} does not exist")
        self.here = self.config.parent
        options = ClientOptions()
        options.realize(args=["-c", str(self.config)], doc="")
        super().__init__(options.serverurl)

    def start(self, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
        """Start supervisord (it daemonizes) and wait until every program is RUNNING."""
        if self.is_running():
            raise SupervisorError(
                f"supervisord is already running for {self.here} (socket {self.socket_path}); "
                "use 'make stop' first or 'supervisorctl -c supervisor.conf status' to inspect it"
            )
        for folder in (self.socket_path.parent,):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        (self.here / "logs" / "supervisor").mkdir(parents=True, exist_ok=True)
        cleanup_orphans(self.here)
        child_env = dict(os.environ if env is None else env)
        bin_dir = str(Path(sys.executable).parent)
        child_env["PATH"] = bin_dir + os.pathsep + child_env.get("PATH", "")
        result = subprocess.run(
            [os.path.join(bin_dir, "supervisord"), "-c", str(self.config)],
            cwd=self.here, env=child_env, capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            raise SupervisorError(f"supervisord failed to start: {result.stderr or result.stdout}")
        self.wait_running(timeout_s)

    def wait_running(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.is_running():
                states = self.states()
                # the model server where the config has one (an older one may not)
                if all(states.get(p) == "RUNNING" for p in PROGRAMS
                       if p in PROCESSES or p in states):
                    return
            time.sleep(0.2)
        raise SupervisorError(f"programs not RUNNING after {timeout_s:.0f} s: {states}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the programs and supervisord, then kill any orphan of ours."""
        if self.is_running():
            with contextlib.suppress(Fault):
                self.call("stopAllProcesses")
            pid = int(self.call("getPID"))
            with contextlib.suppress(OSError, Fault):
                self.call("shutdown")
            _wait_gone(pid, timeout_s)
        cleanup_orphans(self.here)


    def kill_all(self) -> list[int]:
        """kill -9 supervisord first (so it records no exit of its children), then every
        program and listener of ours; returns the pids killed."""
        killed: list[int] = []
        pidfile = self.socket_path.parent / "supervisord.pid"
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            _wait_gone(pid, 10)
        except (OSError, ValueError):
            pass
        return killed + cleanup_orphans(self.here)


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)


def _is_ours(proc: psutil.Process, here: Path) -> bool:
    try:
        cmd = proc.cmdline()
        cwd = proc.cwd()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if Path(cwd).resolve() != here:
        return False
    names = [Path(part).name for part in cmd[:3]]
    return any(a in names and b in cmd for a, b in _OUR_COMMANDS) or (
        "supervisord" in names and any(str(here) in part for part in cmd)
    )


def cleanup_orphans(here: Path) -> list[int]:
    """Kill Trinity processes left behind by a supervisord that was itself killed."""
    here = here.resolve()
    found = [p for p in psutil.process_iter() if p.pid != os.getpid() and _is_ours(p, here)]
    for proc in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(found, timeout=5)
    return [p.pid for p in found]


def supervisord_state(config: Path) -> tuple[str, dict[str, str]]:
    """supervisord's state and its programs' states, when its config can be found."""
    if not config.is_file():
        return f"unknown (no {config})", {}
    try:
        sup = Supervisor(config)
        if not sup.is_running():
            return "not running", {}
        return "running", sup.states()
    except (Exception, SystemExit) as exc:  # supervisor's option parser exits on a bad file
        return f"unknown ({exc})", {}
