"""``trinity doctor``'s checks of everything but the model calls: the plan's pre-test
checklist (Python and packages, settings, folders and disk, ports, supervisord's config,
Firestore, and what an earlier run left behind).

Each check returns a :class:`~trinity.contract.finding.Finding`; none raises for what it
finds. Nothing is started or changed, except the two folders ``trinity run`` creates
before supervisord reads its config (``.run`` and ``logs/supervisor`` beside it), which
supervisord's own parser requires to exist. The model calls' checks are
``trinity.agents.models.doctor``'s.
"""

from __future__ import annotations

import difflib
import errno
import io
import os
import platform
import shutil
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Mapping
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import psutil
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from trinity.bus.config import BusConfig
from trinity.contract import CRASHWATCH, MODELS, PROCESSES
from trinity.contract.finding import FAIL, Finding, failed, passed, warned
from trinity.controller.supervision.supervisord import Supervisor, SupervisorError, _is_ours
from trinity.db import reading
from trinity.errors import ConfigError
from trinity.settings import Settings
from trinity.stores import runs

DISTRIBUTION = "trinity"
INSTALL_FIX = "run `make install` (or `.venv/bin/pip install -e '.[test]'`)"
# TRINITY_* variables read outside Settings (by the WITNESS embedding cache and the
# benchmarks' instant provider); every other one is a field of Settings.
OTHER_VARIABLES = frozenset({"TRINITY_DATA_DIR", "TRINITY_LOG_DIR", "TRINITY_RUN_DIR",
                             "TRINITY_CACHE_DIR", "TRINITY_INSTANT_PROVIDER"})
# What a 24-hour run writes besides supervisord's logs (whose cap comes from its config).
# Measured: a compressed 24-hour run (48 events, 288 metrics samples, 24 snapshots of
# each kind, the hour-12 restart) left 4.2 MB of stores in the data folder and 1.4 MB
# of logs and snapshots in the log folder. A real-time run writes the same events and
# snapshots over more hours of log lines; these allow ~30x and ~90x the measured sizes.
STORES_BYTES = 128 << 20
RUN_LOGS_BYTES = 128 << 20
MB = 1 << 20


def _mb(size: int) -> str:
    return f"{size / MB:,.0f} MB"


# -- Python and packages ---------------------------------------------------------------

def check_python() -> Finding:
    version = platform.python_version()
    try:
        wanted = metadata.metadata(DISTRIBUTION)["Requires-Python"] or ""
    except metadata.PackageNotFoundError:
        return failed("python", f"Python {version}; trinity is not installed in "
                      f"{sys.prefix}", INSTALL_FIX)
    if wanted and not SpecifierSet(wanted).contains(version, prereleases=True):
        return failed("python", f"Python {version} at {sys.executable}; Trinity needs "
                      f"{wanted}", f"make a venv with a Python {wanted} "
                      "(`make install PYTHON=python3.11`)")
    return passed("python", f"Python {version} ({wanted or 'any'}) at {sys.executable}")


def _top_level_modules() -> dict[str, list[str]]:
    """Distribution name (normalized) -> the top-level modules it installs."""
    found: dict[str, list[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            found.setdefault(_normalize(dist), []).append(module)
    return found


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check_packages() -> Finding:
    """Every dependency Trinity declares: installed, at a version it accepts, importable
    (its top-level modules found, not imported: importing them all takes seconds)."""
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return failed("packages", "trinity is not installed", INSTALL_FIX)
    modules = _top_level_modules()
    problems: list[str] = []
    checked = 0
    for line in declared:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's (the tests'), or another platform's
        checked += 1
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} missing")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} (needs {req.specifier})")
            continue
        missing = [m for m in modules.get(_normalize(req.name), []) if find_spec(m) is None]
        if missing:
            problems.append(f"{req.name} installed but {', '.join(missing)} not importable")
    if problems:
        return failed("packages", f"{len(problems)} of {checked} dependencies not usable: "
                      + "; ".join(problems), INSTALL_FIX)
    return passed("packages", f"all {checked} dependencies installed at accepted versions")


# -- settings ---------------------------------------------------------------------------

def known_variables() -> frozenset[str]:
    fields = Settings.__dataclass_fields__.values()
    return OTHER_VARIABLES | {str(f.metadata["env"]) for f in fields
                              if (f.metadata.get("env") or "").startswith("TRINITY_")}


def check_variables(env: Mapping[str, str]) -> Finding:
    """A TRINITY_* variable Trinity does not read is ignored in silence: a misspelt one
    (``TRINITY_TEST_BUDGT``) leaves its setting at the default."""
    known = known_variables()
    typos: list[str] = []
    unknown: list[str] = []
    for name in sorted(n for n in env if n.startswith("TRINITY_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            typos.append(f"{name} (did you mean {close[0]}?)")
        else:
            unknown.append(name)
    if typos:
        return failed("variables", "not settings, so ignored: " + ", ".join(typos + unknown),
                      "rename each to the setting meant (`trinity run --help` lists them)")
    if unknown:
        return warned("variables", f"not read by Trinity: {', '.join(unknown)}",
                      "unset them unless another tool reads them")
    return passed("variables", "every TRINITY_* variable set is a setting")


def routing_path(env: Mapping[str, str]) -> Path | None:
    """The routing policy's path as Settings reads it, for when the settings as a whole
    are not valid (the model checks still run)."""
    raw = env.get(str(Settings.__dataclass_fields__["routing_path"].metadata["env"]), "")
    return Path(raw.strip()).resolve() if raw.strip() else None


def load_settings(env: Mapping[str, str]) -> tuple[Settings | None, Finding]:
    """The settings ``trinity run`` would use, and the line about budget and duration."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        return None, failed("settings", str(exc),
                            "correct or unset that variable (`trinity run --help` lists "
                            "the settings); dirs, disk, ports, Firestore and the stores "
                            "were not checked")
    if settings.scenario_path is not None:
        from trinity.controller.process.scenario import ScenarioDataError, read_scenario

        try:
            read_scenario(settings.scenario_path)
        except ScenarioDataError as exc:
            return settings, failed("settings", f"TRINITY_SCENARIO: {exc}",
                                    "correct the scenario file (the shipped one shows the "
                                    "format), or unset TRINITY_SCENARIO")
    real_h = settings.duration_h / settings.time_scale
    events = int(settings.duration_h * 60 // settings.event_interval_min)
    return settings, passed(
        "settings", f"budget ${settings.budget_usd:.2f} ({settings.budget_mode}), "
        f"{settings.duration_h:g} simulated h at time scale {settings.time_scale:g} "
        f"({real_h:.3g} h real), an event every {settings.event_interval_min:g} simulated "
        f"min ({events} cycles)")


# -- folders and disk -------------------------------------------------------------------

def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (or where it would be created), or None.
    Tried for real: permission bits say nothing for root or a read-only mount."""
    base = _existing(folder)
    if not base.is_dir():
        return f"{base} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".trinity-doctor-"):
            return None
    except OSError as exc:
        return f"cannot write in {base}: {exc.strerror or exc}"


def check_dirs(settings: Settings) -> Finding:
    folders = {"data": settings.data_dir, "log": settings.log_dir, "run": settings.run_dir}
    problems = [f"{what} folder {path}: {why}" for what, path in folders.items()
                if (why := _writable(path)) is not None]
    if problems:
        return failed("dirs", "; ".join(problems),
                      "fix the folder's owner or mount, or point TRINITY_DATA_DIR / "
                      "TRINITY_LOG_DIR / TRINITY_RUN_DIR elsewhere")
    return passed("dirs", ", ".join(f"{what} {path}" for what, path in folders.items())
                  + " writable")


def supervisor_log_cap(options: Any) -> int:
    """The most supervisord's logs can take: each log's maxbytes x (backups + 1)."""
    total = options.logfile_maxbytes * (options.logfile_backups + 1)
    for group in options.process_group_configs:
        for proc in group.process_configs:
            for stream in ("stdout", "stderr"):
                if getattr(proc, f"{stream}_logfile", None):
                    total += getattr(proc, f"{stream}_logfile_maxbytes") * (
                        getattr(proc, f"{stream}_logfile_backups") + 1)
    return int(total)


def check_disk(settings: Settings, config: Path, min_free_bytes: int | None = None) -> Finding:
    """Free space on each filesystem the run writes to, against what the run needs there:
    ``min_free_bytes`` when given, else the estimate above plus supervisord's log cap."""
    needs: list[tuple[Path, int, str]] = [(settings.data_dir, STORES_BYTES, "stores"),
                                          (settings.log_dir, RUN_LOGS_BYTES, "run logs")]
    try:
        options = supervisord_options(config)
        needs.append((Path(options.childlogdir), supervisor_log_cap(options),
                      "supervisord logs at their cap"))
    except ConfigError:  # the supervisord line says what is wrong with the config
        needs.append((settings.data_dir, 0, "supervisord logs not counted (config unreadable)"))
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for path, size, what in needs:
        base = _existing(path)
        device = base.stat().st_dev
        seen = by_device.get(device, (base, 0, []))
        part = f"{what} {_mb(size)}" if size else what
        by_device[device] = (seen[0], seen[1] + size, [*seen[2], part])
    short: list[str] = []
    ok: list[str] = []
    for base, estimate, parts in by_device.values():
        need = min_free_bytes if min_free_bytes is not None else estimate
        why = "as required (--min-free)" if min_free_bytes is not None else \
            f"({' + '.join(parts)})"
        free = shutil.disk_usage(base).free
        line = f"{_mb(free)} free on the filesystem of {base}, {_mb(need)} needed {why}"
        (short if free < need else ok).append(line)
    if short:
        return failed("disk", "; ".join(short),
                      "free space there, or point TRINITY_DATA_DIR / TRINITY_LOG_DIR at a "
                      "disk with room")
    return passed("disk", "; ".join(ok))


# -- ports and the bus ------------------------------------------------------------------

def _holder(port: int) -> str:
    """Who listens on ``port``, when the system says (best effort)."""
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN \
                    and conn.pid:
                return f" by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


# port_problem's answer for an address another machine listens on (a multi-host bus).
ELSEWHERE = "not an address of this machine"


def port_problem(host: str, port: int) -> str | None:
    """Why a listener could not bind ``host:port`` here, or None. SO_REUSEADDR as
    prometheus_client's and ZeroMQ's listeners use, so only a live socket counts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is taken{_holder(port)}"
            if exc.errno == errno.EADDRNOTAVAIL:
                return ELSEWHERE
            return f"cannot bind {host}:{port}: {exc.strerror or exc}"
    return None


def check_ports(settings: Settings) -> Finding:
    wanted: list[tuple[str, str, int, str]] = []  # what, host, port, fix
    if settings.metrics_port:
        wanted.append(("Prometheus /metrics", "127.0.0.1", settings.metrics_port,
                       "set TRINITY_METRICS_PORT to a free port (0 turns /metrics off)"))
    for name, endpoint in sorted(settings.endpoints.items()):
        if endpoint.startswith("tcp://"):
            host, _, port_text = endpoint[len("tcp://"):].rpartition(":")
            host = host.strip("[]")
            wanted.append((f"bus endpoint {name}", "" if host == "*" else host, int(port_text),
                           f"pick another port for {name} in TRINITY_ENDPOINTS"))
    taken: list[str] = []
    fixes: list[str] = []
    elsewhere: list[str] = []
    free: list[str] = []
    for what, host, port, fix in wanted:
        problem = port_problem(host, port)
        where = f"{what} {host or '*'}:{port}"
        if problem == ELSEWHERE:
            elsewhere.append(where)
        elif problem:
            taken.append(f"{where}: {problem}")
            fixes.append(fix)
        else:
            free.append(where)
    if taken:
        return failed("ports", "; ".join(taken),
                      "stop what holds it (`make stop` if it is an earlier run), or "
                      + "; ".join(fixes))
    if elsewhere:
        checked = f"free: {', '.join(free)}; " if free else ""
        return warned("ports", f"{checked}not on this machine, so not checked: "
                      f"{', '.join(elsewhere)}",
                      "run `trinity doctor` on the machine that hosts each")
    if not wanted:
        return passed("ports", "none needed: /metrics off, every bus endpoint an ipc socket")
    return passed("ports", f"free: {', '.join(free)}"
                  + ("" if settings.endpoints else "; the bus uses ipc sockets"))


def check_bus(settings: Settings) -> Finding:
    try:
        BusConfig.of(settings).check()
    except ConfigError as exc:
        return failed("bus", str(exc), "run `trinity keys generate` (or fix the key folder's "
                      "permissions as the message says)")
    keys = f"ZeroMQ CURVE keys in {settings.curve_dir}" if settings.curve_dir else \
        "no CURVE keys (every endpoint on loopback)"
    return passed("bus", f"sockets in {settings.run_dir}; {keys}")


# -- supervisord ------------------------------------------------------------------------

def _realize(options: Any, config: Path) -> Any:
    """``options`` (supervisor's ServerOptions or ClientOptions) read from ``config``, or
    ConfigError with supervisor's message: its parser prints it and exits; both are
    caught here."""
    options.stderr = options.stdout = io.StringIO()
    try:
        options.realize(args=["-c", str(config)], doc="")
    except SystemExit:
        lines = [line.removeprefix("Error: ") for line in options.stderr.getvalue().splitlines()
                 if line.strip() and not line.startswith("For help")]
        raise ConfigError(" ".join(lines) or f"supervisord rejected {config}") from None
    return options


def supervisord_options(config: Path) -> Any:
    """supervisord's own parse of ``config`` (its ServerOptions), or ConfigError."""
    from supervisor.options import ClientOptions, ServerOptions

    if not config.is_file():
        raise ConfigError(f"supervisord config {config} does not exist")
    serverurl = str(_realize(ClientOptions(), config).serverurl)
    # The folders `trinity run` creates before it starts supervisord (Supervisor.start),
    # whose parser wants the folders of its pid and log files to exist already.
    for folder in (Path(serverurl.removeprefix("unix://")).parent if serverurl.startswith(
            "unix://") else None, config.resolve().parent / "logs" / "supervisor"):
        if folder is not None and not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _realize(ServerOptions(), config)


def check_supervisord(config: Path) -> Finding:
    fix = f"restore it with `git checkout -- {config.name}`, or correct the line named"
    try:
        options = supervisord_options(config)
    except ConfigError as exc:
        return failed("supervisord", f"{config}: {exc}", fix)
    programs = {p.name: p for g in options.process_group_configs for p in g.process_configs}
    missing = [name for name in (*PROCESSES, CRASHWATCH) if name not in programs]
    # A program told to call the model server needs the server among the programs.
    callers = sorted(name for name, p in programs.items()
                     if (p.environment or {}).get("TRINITY_MODEL_SERVER", "").strip().lower()
                     not in ("", "off", "0", "false", "no"))
    if callers and MODELS not in programs:
        return failed("supervisord", f"{config}: {', '.join(callers)} call the model server "
                      f"(TRINITY_MODEL_SERVER) but there is no [program:{MODELS}]", fix)
    if missing:
        return failed("supervisord", f"{config} has no program {', '.join(missing)}", fix)
    # `trinity run` starts supervisord with this interpreter's bin folder first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    unfound = sorted({p.command.split()[0] for p in programs.values()
                      if shutil.which(p.command.split()[0], path=path) is None})
    if unfound:
        return failed("supervisord", f"{config}: command {', '.join(unfound)} not found",
                      INSTALL_FIX)
    return passed("supervisord", f"{config} parsed by supervisord: programs "
                  f"{', '.join(sorted(programs))}")


# -- Firestore --------------------------------------------------------------------------

def check_firestore(settings: Settings) -> Finding:
    if settings.pattern_backend != "firestore":
        return passed("firestore", f"not used (pattern backend {settings.pattern_backend})")
    from google.api_core.exceptions import GoogleAPIError

    from trinity.stores.patterns.firestore import (
        CALL_TIMEOUT_S,
        FirestoreReplica,
        check_credentials,
    )

    host = settings.firestore_emulator_host
    where = f"the emulator at {host}" if host else f"project {settings.firestore_project}"
    fix = ("start the emulator (`make firestore-emulator`) or correct FIRESTORE_EMULATOR_HOST"
           if host else "check the credentials and network (or set FIRESTORE_EMULATOR_HOST)")
    fix += "; or TRINITY_PATTERN_BACKEND=sqlite"
    try:
        check_credentials(host)
        replica = FirestoreReplica(settings.firestore_project)
        try:
            replica.collection("patterns").limit(1).get(timeout=CALL_TIMEOUT_S, retry=None)
        finally:
            replica.close()
    except ConfigError as exc:
        return failed("firestore", str(exc), fix)
    except GoogleAPIError as exc:
        return failed("firestore", f"{where} not reachable: {str(exc).splitlines()[0]}", fix)
    return passed("firestore", f"{where} answered (project {settings.firestore_project})")


# -- what an earlier run left ----------------------------------------------------------

def _clean_command(settings: Settings, config: Path) -> str:
    if settings.data_dir == config.resolve().parent:
        return "`make clean`"
    return f"`rm -f {settings.data_dir}/trinity_*` (`make clean` cleans only {config.parent})"


def check_processes(config: Path) -> Finding:
    """supervisord of this folder still running, or programs it left (it was killed)."""
    here = config.resolve().parent
    running, states = False, {}
    try:
        supervisord_options(config)  # quietly: Supervisor's own parse prints its errors
        sup = Supervisor(config)
        running = sup.is_running()
        states = sup.states() if running else {}
    except (ConfigError, SupervisorError, OSError):
        pass  # no supervisord can run from a broken config; orphans are still looked for
    if running:
        programs = ", ".join(f"{name} {state}" for name, state in sorted(states.items()))
        return failed("processes", f"supervisord is running for {here} ({programs})",
                      "`trinity status` shows its run; `make stop` ends it")
    orphans = [p for p in psutil.process_iter() if p.pid != os.getpid() and _is_ours(p, here)]
    if orphans:
        return failed("processes", "programs of an earlier run still running without "
                      f"supervisord (pids {', '.join(str(p.pid) for p in orphans)})",
                      "`make stop` kills them")
    return passed("processes", f"no supervisord or program of {here} running")


def check_stores(settings: Settings, config: Path) -> Finding:
    """Stores of an earlier run: a new run shares them (WITNESS keeps what it learned, the
    cost ledger adds up) instead of starting from the plan's clean slate."""
    stores = sorted(p.name for pattern in ("trinity_*.db", "trinity_*.faiss")
                    for p in settings.data_dir.glob(pattern))
    if not stores:
        return passed("stores", f"clean slate: no stores in {settings.data_dir}")
    latest: runs.Run | None = None
    count = 0
    if settings.messages_db.exists():
        try:
            with reading(settings.messages_db) as conn:
                latest = runs.latest_run(conn)
                count = len(runs.all_runs(conn))
        except sqlite3.Error as exc:
            return failed("stores", f"{settings.messages_db} unreadable: {exc}",
                          f"{_clean_command(settings, config)} removes it")
    clean = _clean_command(settings, config)
    if latest is not None and latest.status == runs.ACTIVE:
        # Running (the processes line says so) or interrupted: a kill -9 ends no run.
        return warned("stores", f"run {latest.run_id} has not ended, at simulated "
                      f"{latest.sim_elapsed_s / 3600:.2f} h ({', '.join(stores)})",
                      f"`trinity run --resume --detach` continues it; {clean} for a clean "
                      "slate (a new run would share its stores)")
    runs_text = f"{count} earlier run{'s' * (count != 1)}" + (
        f", the latest {latest.run_id} {latest.status}" if latest else "")
    return warned("stores", f"{', '.join(stores)} in {settings.data_dir} ({runs_text})",
                  f"{clean} for the plan's clean slate (else WITNESS starts from what it "
                  "learned and the cost ledger adds up)")


# -- all of them ------------------------------------------------------------------------

def examine(env: Mapping[str, str], config: Path, *, min_free_bytes: int | None = None,
            skip: frozenset[str] = frozenset()) -> tuple[Settings | None, list[Finding]]:
    """Every check of this module, in the checklist's order; the settings too (None when
    they are not valid: the checks that need them are then not run)."""
    findings: list[Finding] = []

    def run(name: str, check: Callable[[], Finding]) -> None:
        if name not in skip:
            findings.append(check())

    run("python", check_python)
    run("packages", check_packages)
    run("variables", lambda: check_variables(env))
    settings, line = load_settings(env)
    findings.append(line)
    run("supervisord", lambda: check_supervisord(config))
    run("processes", lambda: check_processes(config))
    if settings is not None:
        run("dirs", lambda: check_dirs(settings))
        run("disk", lambda: check_disk(settings, config, min_free_bytes))
        run("ports", lambda: check_ports(settings))
        run("bus", lambda: check_bus(settings))
        run("firestore", lambda: check_firestore(settings))
        run("stores", lambda: check_stores(settings, config))
    return settings, findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0

