"""Settings: one frozen dataclass, built once from ``TRINITY_*`` variables and flags.

Units are in the names (``_s``, ``_min``, ``_h``, ``_bytes``). ``validate()``
raises :class:`ConfigError` with a message naming the variable, before anything
starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trinity.errors import ConfigError

# Unix socket paths are limited to 108 bytes including the terminator; leave room
# for the longest file name placed in the run directory.
_MAX_RUN_DIR_LEN = 80
# warn: budget alerts only, the run goes on as planned; enforce: once the budget is
# spent, every call is routed to a free (local) provider.
BUDGET_MODES = ("warn", "enforce")
# The controller's Prometheus /metrics port (loopback only); 0 turns the endpoint off.
# 9464 is the port the Prometheus exporter of OpenTelemetry uses by convention.
DEFAULT_METRICS_PORT = 9464


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None


def _validate_metrics_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"metrics_port (TRINITY_METRICS_PORT) must be a TCP port 1..65535, or 0 to turn "
            f"the /metrics endpoint off, got {port!r}")


def _validate_restart_intensity(restarts: int) -> None:
    if not 0 <= restarts <= 1000:
        raise ConfigError(
            f"restart_intensity (TRINITY_RESTART_INTENSITY) must be 0..1000 restarts per "
            f"period (0 turns self-healing off), got {restarts!r}")


def default_run_dir(data_dir: Path) -> Path:
    """Where sockets live: ``<data_dir>/.run``, or a short path under /tmp if that is too long."""
    candidate = data_dir / ".run"
    if len(str(candidate)) <= _MAX_RUN_DIR_LEN:
        return candidate
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"trinity-{os.getuid()}-{digest}"


PATTERN_BACKENDS = ("sqlite", "firestore")
# The ZeroMQ CURVE key folder when TRINITY_CURVE_DIR is not set (`trinity keys generate`
# writes it); the bus uses keys only when this folder exists.
CURVE_DIR_NAME = "curve_keys"


def curve_keys_dir(env: Mapping[str, str]) -> tuple[Path, bool]:
    """Where the CURVE keys are (or go), and whether TRINITY_CURVE_DIR named it."""
    raw = (env.get("TRINITY_CURVE_DIR") or "").strip()
    if raw:
        return Path(raw).resolve(), True
    data_dir = Path(env.get("TRINITY_DATA_DIR") or os.getcwd()).resolve()
    return data_dir / CURVE_DIR_NAME, False


def _env_endpoints(env: Mapping[str, str]) -> Mapping[str, str]:
    from trinity.bus.topology import parse_endpoints  # trinity.bus imports this module

    return MappingProxyType(parse_endpoints(env.get("TRINITY_ENDPOINTS") or ""))


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    log_dir: Path
    run_dir: Path
    time_scale: float = 1.0
    duration_h: float = 24.0
    event_interval_min: float = 30.0
    heartbeat_interval_s: float = 1.0
    heartbeat_max_missed: int = 3
    startup_grace_s: float = 30.0
    poll_interval_s: float = 0.2
    max_payload_bytes: int = 1 << 20
    batch_size: int = 500
    budget_usd: float = 10.0
    budget_mode: str = "warn"
    routing_path: Path | None = None
    snapshot_interval_min: float = 60.0
    metrics_interval_min: float = 5.0
    alert_webhook: str = ""
    scenario_seed: int = 0
    noise_events: int = 0
    scenario_path: Path | None = None
    metrics_port: int = DEFAULT_METRICS_PORT
    # Where the pattern store's record lives: the local SQLite file only, or Firestore
    # too (the local file then buffers what Firestore has not acknowledged yet).
    pattern_backend: str = "sqlite"
    firestore_project: str = ""
    firestore_emulator_host: str = ""
    # Where a process listens instead of its ipc socket, by process name.
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The folder of ZeroMQ CURVE keys when the bus uses them (every socket then does);
    # None: no keys, so every endpoint must be on loopback.
    curve_dir: Path | None = None
    # Self-healing: at most this many controller restarts of one hung agent within the
    # period (OTP's intensity and period); past it, an alert instead. 0: never restart.
    restart_intensity: int = 5
    restart_period_s: float = 30.0
    # Real seconds the controller's loop may go without touching its alive file before
    # supervisord's listener restarts it (``trinity.controller.watchdog``).
    controller_deadline_s: float = 30.0

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
            "time_scale": _env_float(env, "TRINITY_TIME_SCALE", 1.0),
            "duration_h": _env_float(env, "TRINITY_TEST_DURATION", 24.0),
            "event_interval_min": _env_float(env, "TRINITY_EVENT_INTERVAL", 30.0),
            "heartbeat_interval_s": _env_float(env, "TRINITY_HEARTBEAT_INTERVAL", 1.0),
            "heartbeat_max_missed": _env_int(env, "TRINITY_HEARTBEAT_MAX_MISSED", 3),
            "startup_grace_s": _env_float(env, "TRINITY_STARTUP_GRACE", 30.0),
            "max_payload_bytes": _env_int(env, "TRINITY_MAX_PAYLOAD_BYTES", 1 << 20),
            "budget_usd": _env_float(env, "TRINITY_TEST_BUDGET", 10.0),
            "budget_mode": (env.get("TRINITY_BUDGET_MODE") or "warn").strip().lower(),
            "routing_path": Path(env["TRINITY_ROUTING"]).resolve()
            if env.get("TRINITY_ROUTING") else None,
            "snapshot_interval_min": _env_float(env, "TRINITY_SNAPSHOT_INTERVAL", 60.0),
            "metrics_interval_min": _env_float(env, "TRINITY_METRICS_INTERVAL", 5.0),
            "alert_webhook": (env.get("TRINITY_ALERT_WEBHOOK") or "").strip(),
            "scenario_seed": _env_int(env, "TRINITY_SCENARIO_SEED", 0),
            "noise_events": _env_int(env, "TRINITY_NOISE_EVENTS", 0),
            "scenario_path": Path(env["TRINITY_SCENARIO"]).resolve()
            if env.get("TRINITY_SCENARIO") else None,
            "metrics_port": _env_int(env, "TRINITY_METRICS_PORT", DEFAULT_METRICS_PORT),
            "pattern_backend": (env.get("TRINITY_PATTERN_BACKEND") or "sqlite").strip().lower(),
            "firestore_project": (env.get("GOOGLE_CLOUD_PROJECT") or "").strip(),
            "firestore_emulator_host": (env.get("FIRESTORE_EMULATOR_HOST") or "").strip(),
            "endpoints": _env_endpoints(env),
            "curve_dir": keys_dir if keys_named or os.path.exists(keys_dir) else None,
            "restart_intensity": _env_int(env, "TRINITY_RESTART_INTENSITY", 5),
            "restart_period_s": _env_float(env, "TRINITY_RESTART_PERIOD", 30.0),
            "controller_deadline_s": _env_float(env, "TRINITY_CONTROLLER_DEADLINE", 30.0),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = {
            "time_scale (TRINITY_TIME_SCALE)": self.time_scale,
            "duration_h (TRINITY_TEST_DURATION)": self.duration_h,
            "event_interval_min (TRINITY_EVENT_INTERVAL)": self.event_interval_min,
            "heartbeat_interval_s (TRINITY_HEARTBEAT_INTERVAL)": self.heartbeat_interval_s,
            "poll_interval_s": self.poll_interval_s,
            "snapshot_interval_min (TRINITY_SNAPSHOT_INTERVAL)": self.snapshot_interval_min,
            "metrics_interval_min (TRINITY_METRICS_INTERVAL)": self.metrics_interval_min,
            "restart_period_s (TRINITY_RESTART_PERIOD)": self.restart_period_s,
            "controller_deadline_s (TRINITY_CONTROLLER_DEADLINE)": self.controller_deadline_s,
        }
        for name, value in positive.items():
            if not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a finite number greater than 0, got {value!r}")
        if not 0 <= self.startup_grace_s < float("inf"):
            raise ConfigError(
                f"startup_grace_s (TRINITY_STARTUP_GRACE) must be a finite number >= 0, "
                f"got {self.startup_grace_s!r}")
        if self.heartbeat_max_missed < 1:
            raise ConfigError("heartbeat_max_missed (TRINITY_HEARTBEAT_MAX_MISSED) must be >= 1")
        if not 1024 <= self.max_payload_bytes <= 64 << 20:
            raise ConfigError("max_payload_bytes (TRINITY_MAX_PAYLOAD_BYTES) must be 1 KiB..64 MiB")
        if not 0 <= self.budget_usd < float("inf"):
            raise ConfigError(
                f"budget_usd (TRINITY_TEST_BUDGET) must be a finite number >= 0, "
                f"got {self.budget_usd!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ConfigError(
                f"budget_mode (TRINITY_BUDGET_MODE) must be one of {', '.join(BUDGET_MODES)}, "
                f"got {self.budget_mode!r}")
        if not 0 <= self.noise_events <= 100:
            raise ConfigError(
                f"noise_events (TRINITY_NOISE_EVENTS) must be 0..100 per event interval, "
                f"got {self.noise_events!r}")
        _validate_metrics_port(self.metrics_port)
        _validate_restart_intensity(self.restart_intensity)
        self._validate_pattern_backend()
        self._validate_bus_security()
        if self.alert_webhook:
            from trinity.controller.webhook import validate_webhook_url

            validate_webhook_url(self.alert_webhook)
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if len(str(self.run_dir)) > _MAX_RUN_DIR_LEN + 20:
            raise ConfigError(
                f"run directory {self.run_dir} is too long for unix sockets; "
                "set TRINITY_RUN_DIR to a shorter path"
            )

    def _validate_bus_security(self) -> None:
        from trinity.bus import curve
        from trinity.bus.topology import DEFAULT_TOPOLOGY, require_keys_off_loopback

        DEFAULT_TOPOLOGY.with_endpoints(self.endpoints)  # names and syntax
        if self.curve_dir is not None:
            curve.check_keys_dir(self.curve_dir)
        require_keys_off_loopback(self.endpoints, have_keys=self.curve_dir is not None)

    def _validate_pattern_backend(self) -> None:
        if self.pattern_backend not in PATTERN_BACKENDS:
            raise ConfigError(
                f"pattern_backend (TRINITY_PATTERN_BACKEND) must be one of "
                f"{', '.join(PATTERN_BACKENDS)}, got {self.pattern_backend!r}")
        if self.pattern_backend == "firestore" and not self.firestore_project:
            raise ConfigError("TRINITY_PATTERN_BACKEND=firestore needs GOOGLE_CLOUD_PROJECT "
                              "(and FIRESTORE_EMULATOR_HOST=host:port for an emulator)")
        if self.pattern_backend == "firestore" and not self.firestore_emulator_host:
            # Real Firestore: without credentials WITNESS could not start at all.
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                google.auth.default()
            except DefaultCredentialsError as exc:
                raise ConfigError(
                    f"TRINITY_PATTERN_BACKEND=firestore: no Google credentials ({exc}); set "
                    "FIRESTORE_EMULATOR_HOST=host:port to use an emulator") from None

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
    def heartbeat_deadline_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_max_missed

    def replace(self, **changes: Any) -> Settings:
        updated = dataclasses.replace(self, **changes)
        updated.validate()
        return updated
