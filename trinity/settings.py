"""Settings: one frozen dataclass, built once from ``TRINITY_*`` variables and flags.

Each field declares itself once, with :func:`setting`: its default, the variable it is
read from, the help text (``trinity run --help`` shows it with both), and the check its
value must pass. :meth:`Settings.from_env` parses the variables, lets keyword overrides
(CLI flags) win, and :meth:`Settings.validate` raises :class:`ConfigError` with a
message naming the variable, before anything starts. Nothing here opens a file,
socket or connection: the checks that need one (CURVE key folders, Firestore
credentials) run where that resource is opened, and ``trinity run`` asks them first.

Units are in the names (``_s``, ``_min``, ``_h``, ``_bytes``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trinity.contract import PROCESSES
from trinity.endpoints import parse_endpoints, require_keys_off_loopback
from trinity.errors import ConfigError
from trinity.urls import validate_webhook_url

# Unix socket paths are limited to 108 bytes including the terminator; leave room
# for the longest file name placed in the run directory.
_MAX_RUN_DIR_LEN = 80
# warn: budget alerts only, the run goes on as planned; enforce: once the budget is
# spent, every call is routed to a free (local) provider.
BUDGET_MODES = ("warn", "enforce")
PATTERN_BACKENDS = ("sqlite", "firestore")
# The controller's Prometheus /metrics port (loopback only); 0 turns the endpoint off.
# 9464 is the port the Prometheus exporter of OpenTelemetry uses by convention.
DEFAULT_METRICS_PORT = 9464
# The ZeroMQ CURVE key folder when TRINITY_CURVE_DIR is not set (`trinity keys generate`
# writes it); the bus uses keys only when this folder exists.
CURVE_DIR_NAME = "curve_keys"

# A check returns what is wrong with a value (completing "<name> must ..."), or None;
# it may raise ConfigError with a whole message of its own instead.
Check = Callable[[Any], str | None]


def _positive(value: Any) -> str | None:
    if 0 < value < math.inf:
        return None
    return f"be a finite number greater than 0, got {value!r}"


def _not_negative(value: Any) -> str | None:
    if 0 <= value < math.inf:
        return None
    return f"be a finite number >= 0, got {value!r}"


def _between(low: int, high: int, what: str) -> Check:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"be {what}, got {value!r}"
    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"be one of {', '.join(choices)}, got {value!r}"
    return check


def setting(default: Any, env: str | None = None, help: str = "", *,
            check: Check | None = None, lower: bool = False) -> Any:
    """A field of :class:`Settings`: its default, variable, help text and check, once.

    ``lower``: a text value is stripped and lower-cased (choices like ``warn``)."""
    return field(default=default,
                 metadata={"env": env, "help": help, "check": check, "lower": lower})


def default_run_dir(data_dir: Path) -> Path:
    """Where sockets live: ``<data_dir>/.run``, or a short path under /tmp if that is too long."""
    candidate = data_dir / ".run"
    if len(str(candidate)) <= _MAX_RUN_DIR_LEN:
        return candidate
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"trinity-{os.getuid()}-{digest}"


def curve_keys_dir(env: Mapping[str, str]) -> tuple[Path, bool]:
    """Where the CURVE keys are (or go), and whether TRINITY_CURVE_DIR named it."""
    raw = (env.get("TRINITY_CURVE_DIR") or "").strip()
    if raw:
        return Path(raw).resolve(), True
    data_dir = Path(env.get("TRINITY_DATA_DIR") or os.getcwd()).resolve()
    return data_dir / CURVE_DIR_NAME, False


_ON = ("on", "1", "true", "yes")
_OFF = ("", "off", "0", "false", "no")
# The shared model server's socket in the run directory (`trinity model-server`).
MODEL_SERVER_SOCKET = "models.sock"
# Its pid, beside the socket: the controller samples its memory with the agents'.
MODEL_SERVER_PID_FILE = "models.pid"


def _model_server_check(value: Any) -> str | None:
    """``on``/``off`` or the server's endpoint: ipc, or tcp on loopback (the server takes
    requests from anyone who can reach it, so it never listens beyond this machine)."""
    if str(value).strip().lower() in (*_ON, *_OFF):
        return None
    from trinity.endpoints import check_endpoint, is_loopback

    try:
        check_endpoint(value, any_port=False)
    except ConfigError as exc:
        return f"be on, off or the model server's endpoint: {exc}"
    return None if is_loopback(value) else (
        f"be on this machine (ipc:// or tcp on loopback), got {value!r}")


def _webhook_check(url: Any) -> str | None:
    """Raises the URL check's own message (it names the variable), or passes."""
    if url:
        validate_webhook_url(url)
    return None


@dataclass(frozen=True)
class Settings:
    # Where things are (set from TRINITY_DATA_DIR, TRINITY_LOG_DIR, TRINITY_RUN_DIR).
    data_dir: Path
    log_dir: Path
    run_dir: Path
    # The run's schedule, in simulated time.
    time_scale: float = setting(1.0, "TRINITY_TIME_SCALE", "Simulated seconds per real second",
                                check=_positive)
    duration_h: float = setting(24.0, "TRINITY_TEST_DURATION", "Simulated hours",
                                check=_positive)
    event_interval_min: float = setting(30.0, "TRINITY_EVENT_INTERVAL",
                                        "Simulated minutes between events", check=_positive)
    snapshot_interval_min: float = setting(
        60.0, "TRINITY_SNAPSHOT_INTERVAL", "Simulated minutes between cost and pattern "
        "snapshots", check=_positive)
    metrics_interval_min: float = setting(5.0, "TRINITY_METRICS_INTERVAL",
                                          "Simulated minutes between system metrics samples",
                                          check=_positive)
    scenario_seed: int = setting(0, "TRINITY_SCENARIO_SEED",
                                 "Scenario seed: which event variants are drawn")
    noise_events: int = setting(0, "TRINITY_NOISE_EVENTS",
                                "Noise events (none of the five patterns) per event interval",
                                check=_between(0, 100, "0..100 per event interval"))
    scenario_path: Path | None = setting(None, "TRINITY_SCENARIO",
                                         "A JSON Lines scenario file in the shipped format")
    # Heartbeats and the bus.
    heartbeat_interval_s: float = setting(1.0, "TRINITY_HEARTBEAT_INTERVAL",
                                          "Real seconds between an agent's heartbeats",
                                          check=_positive)
    heartbeat_max_missed: int = setting(3, "TRINITY_HEARTBEAT_MAX_MISSED",
                                        "Heartbeats missed before an agent is silent",
                                        check=_between(1, 1 << 30, ">= 1"))
    startup_grace_s: float = setting(30.0, "TRINITY_STARTUP_GRACE",
                                     "Seconds an agent may take to send its first heartbeat",
                                     check=_not_negative)
    poll_interval_s: float = setting(0.2, check=_positive)
    max_payload_bytes: int = setting(1 << 20, "TRINITY_MAX_PAYLOAD_BYTES",
                                     "Largest message payload in bytes",
                                     check=_between(1024, 64 << 20, "1 KiB..64 MiB"))
    batch_size: int = setting(500, check=_between(1, 1 << 30, "at least 1"))
    # Where a process listens instead of its ipc socket, by process name.
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}),
                                         metadata={"env": "TRINITY_ENDPOINTS"})
    # The folder of ZeroMQ CURVE keys when the bus uses them (every socket then does);
    # None: no keys, so every endpoint must be on loopback.
    curve_dir: Path | None = field(default=None, metadata={"env": "TRINITY_CURVE_DIR"})
    # Models and their cost.
    budget_usd: float = setting(10.0, "TRINITY_TEST_BUDGET", "Total model budget in USD",
                                check=_not_negative)
    budget_mode: str = setting("warn", "TRINITY_BUDGET_MODE",
                               "warn: alerts only; enforce: route every call local once the "
                               "budget is spent", check=_one_of(BUDGET_MODES), lower=True)
    routing_path: Path | None = setting(None, "TRINITY_ROUTING",
                                        "The model routing policy (TOML)")
    # The embedded model in one shared process (supervisord's `models` program) instead
    # of a copy in each model agent: its context, vocabulary and mapped weights once.
    model_server: str = setting("", "TRINITY_MODEL_SERVER",
                                "Model agents call the shared model server for the embedded "
                                "model: on (its socket in the run directory), off (each "
                                "loads the model itself) or the server's endpoint",
                                check=_model_server_check)
    # Alerts and metrics.
    alert_webhook: str = setting("", "TRINITY_ALERT_WEBHOOK",
                                 "http(s) URL every alert is POSTed to as JSON",
                                 check=_webhook_check)
    metrics_port: int = setting(DEFAULT_METRICS_PORT, "TRINITY_METRICS_PORT",
                                "The controller's Prometheus /metrics port on 127.0.0.1",
                                check=_between(0, 65535, "a TCP port 1..65535, or 0 to turn "
                                               "the /metrics endpoint off"))
    # Where the pattern store's record lives: the local SQLite file only, or Firestore
    # too (the local file then buffers what Firestore has not acknowledged yet).
    pattern_backend: str = setting("sqlite", "TRINITY_PATTERN_BACKEND",
                                   "Where the pattern store's record lives",
                                   check=_one_of(PATTERN_BACKENDS), lower=True)
    firestore_project: str = setting("", "GOOGLE_CLOUD_PROJECT", "The Firestore project")
    firestore_emulator_host: str = setting("", "FIRESTORE_EMULATOR_HOST",
                                           "host:port of a Firestore emulator")
    # After a run: the git repository whose HEAD a passing run tags (never pushed).
    tag_repo: Path | None = setting(None, "TRINITY_TAG_REPO",
                                    "A git repository whose HEAD a passing run tags "
                                    "trinity-24h-validated-YYYYMMDD (not pushed)")
    # Self-healing: at most this many controller restarts of one hung agent within the
    # period (OTP's intensity and period); past it, an alert instead. 0: never restart.
    restart_intensity: int = setting(
        5, "TRINITY_RESTART_INTENSITY", "Restarts of one hung agent allowed per period",
        check=_between(0, 1000, "0..1000 restarts per period (0 turns self-healing off)"))
    restart_period_s: float = setting(30.0, "TRINITY_RESTART_PERIOD",
                                      "The restart intensity's period in seconds",
                                      check=_positive)
    # Real seconds the controller's loop may go without touching its alive file before
    # supervisord's listener restarts it (``trinity.controller.supervision.watchdog``).
    controller_deadline_s: float = setting(
        30.0, "TRINITY_CONTROLLER_DEADLINE", "Real seconds the controller's loop may stall "
        "before it is restarted", check=_positive)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from the environment; keyword overrides (from CLI flags) win."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("TRINITY_DATA_DIR") or os.getcwd()).resolve()
        log_dir = Path(env.get("TRINITY_LOG_DIR") or data_dir / "logs" / "24h_test")
        run_dir_raw = env.get("TRINITY_RUN_DIR")
        keys_dir, keys_named = curve_keys_dir(env)
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "log_dir": log_dir if log_dir.is_absolute() else data_dir / log_dir,
            "run_dir": Path(run_dir_raw).resolve() if run_dir_raw else default_run_dir(data_dir),
            "endpoints": MappingProxyType(parse_endpoints(env.get("TRINITY_ENDPOINTS") or "",
                                                          PROCESSES)),
            "curve_dir": keys_dir if keys_named or os.path.exists(keys_dir) else None,
        }
        for f in dataclasses.fields(cls):
            if f.name not in values and f.metadata.get("env"):
                raw = env.get(f.metadata["env"])
                if raw is not None and raw.strip():
                    values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise ConfigError(f"{label(f.name)} must {problem}")
        if self.pattern_backend == "firestore" and not self.firestore_project:
            raise ConfigError("TRINITY_PATTERN_BACKEND=firestore needs GOOGLE_CLOUD_PROJECT "
                              "(and FIRESTORE_EMULATOR_HOST=host:port for an emulator)")
        require_keys_off_loopback(self.endpoints, have_keys=self.curve_dir is not None)
        if len(str(self.run_dir)) > _MAX_RUN_DIR_LEN + 20:
            raise ConfigError(
                f"run directory {self.run_dir} is too long for unix sockets; "
                "set TRINITY_RUN_DIR to a shorter path"
            )

    @classmethod
    def option_help(cls, name: str) -> str:
        """A CLI flag's help: the field's text, its variable and its default."""
        f = cls.__dataclass_fields__[name]
        default = "unset" if f.default in (None, "") else f"{f.default:g}" if isinstance(
            f.default, float) else f.default
        return f"{f.metadata['help']} [{f.metadata['env']}, {default}]."

    @property
    def messages_db(self) -> Path:
        return self.data_dir / "trinity_messages.db"

    @property
    def patterns_db(self) -> Path:
        return self.data_dir / "trinity_patterns.db"

    @property
    def costs_db(self) -> Path:
        return self.data_dir / "trinity_costs.db"

    @property
    def model_server_endpoint(self) -> str | None:
        """Where the model agents send embedded-model calls; None: they run it themselves."""
        value = self.model_server.strip()
        if value.lower() in _OFF:
            return None
        return self.model_server_bind if value.lower() in _ON else value

    @property
    def model_server_bind(self) -> str:
        """Where ``trinity model-server`` listens: the endpoint set, else its socket in the
        run directory."""
        value = self.model_server.strip()
        if value.lower() in (*_ON, *_OFF):
            return f"ipc://{self.run_dir}/{MODEL_SERVER_SOCKET}"
        return value

    @property
    def model_server_pid_file(self) -> Path:
        return self.run_dir / MODEL_SERVER_PID_FILE

    @property
    def heartbeat_deadline_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_max_missed

    def replace(self, **changes: Any) -> Settings:
        updated = dataclasses.replace(self, **changes)
        updated.validate()
        return updated


def label(name: str) -> str:
    """A field as messages name it: ``time_scale (TRINITY_TIME_SCALE)``."""
    env = Settings.__dataclass_fields__[name].metadata.get("env")
    return f"{name} ({env})" if env else name


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    env = f.metadata["env"]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    text = raw.strip()
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not a number") from None
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not a whole number") from None
    if kind.startswith("Path"):
        return Path(text).resolve()
    return text.lower() if f.metadata.get("lower") else text
