"""Settings.from_env: defaults, parsing, overrides, validation, the socket folder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.controller.ops.run import preflight
from trinity.errors import ConfigError
from trinity.settings import Settings, default_run_dir

# Every TRINITY_* variable Settings reads, with a valid non-default value and the
# field it sets.
VARIABLES = {
    "TRINITY_TIME_SCALE": ("1440", "time_scale", 1440.0),
    "TRINITY_TEST_DURATION": ("0.5", "duration_h", 0.5),
    "TRINITY_EVENT_INTERVAL": ("7.5", "event_interval_min", 7.5),
    "TRINITY_HEARTBEAT_INTERVAL": ("0.25", "heartbeat_interval_s", 0.25),
    "TRINITY_HEARTBEAT_MAX_MISSED": ("5", "heartbeat_max_missed", 5),
    "TRINITY_MAX_PAYLOAD_BYTES": ("65536", "max_payload_bytes", 65536),
    "TRINITY_METRICS_PORT": ("9100", "metrics_port", 9100),
}
FLOAT_VARIABLES = [name for name, (_, field, _) in VARIABLES.items()
                   if isinstance(Settings.__dataclass_fields__[field].default, float)]

INVALID = [
    ("TRINITY_TIME_SCALE", "abc"),
    ("TRINITY_TIME_SCALE", "0"),
    ("TRINITY_TIME_SCALE", "-1440"),
    ("TRINITY_TIME_SCALE", "nan"),
    ("TRINITY_TIME_SCALE", "inf"),
    ("TRINITY_TIME_SCALE", "1,5"),
    ("TRINITY_TEST_DURATION", "24h"),
    ("TRINITY_TEST_DURATION", "0"),
    ("TRINITY_TEST_DURATION", "-1"),
    ("TRINITY_TEST_DURATION", "1e400"),
    ("TRINITY_EVENT_INTERVAL", "thirty"),
    ("TRINITY_EVENT_INTERVAL", "0.0"),
    ("TRINITY_EVENT_INTERVAL", "-30"),
    ("TRINITY_HEARTBEAT_INTERVAL", "1s"),
    ("TRINITY_HEARTBEAT_INTERVAL", "0"),
    ("TRINITY_HEARTBEAT_INTERVAL", "-inf"),
    ("TRINITY_HEARTBEAT_MAX_MISSED", "three"),
    ("TRINITY_HEARTBEAT_MAX_MISSED", "2.5"),
    ("TRINITY_HEARTBEAT_MAX_MISSED", "0"),
    ("TRINITY_HEARTBEAT_MAX_MISSED", "-3"),
    ("TRINITY_MAX_PAYLOAD_BYTES", "1MiB"),
    ("TRINITY_MAX_PAYLOAD_BYTES", "1e6"),
    ("TRINITY_MAX_PAYLOAD_BYTES", "1023"),
    ("TRINITY_MAX_PAYLOAD_BYTES", "0"),
    ("TRINITY_MAX_PAYLOAD_BYTES", str((64 << 20) + 1)),
]


@pytest.fixture
def data_dir() -> Path:
    """A data dir short enough that the run directory stays inside it (never created)."""
    return Path("/tmp") / f"trs-{os.getpid()}"


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.data_dir == tmp_path.resolve()
    assert s.log_dir == s.data_dir / "logs" / "24h_test"
    assert s.run_dir == default_run_dir(s.data_dir)
    assert s.messages_db == s.data_dir / "trinity_messages.db"
    assert (s.time_scale, s.duration_h, s.event_interval_min) == (1.0, 24.0, 30.0)
    assert (s.heartbeat_interval_s, s.heartbeat_max_missed) == (1.0, 3)
    assert s.heartbeat_deadline_s == 3.0
    assert s.poll_interval_s == 0.2
    assert s.max_payload_bytes == 1 << 20
    assert s.batch_size == 500


def test_reads_os_environ_when_no_mapping_is_given(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    for name in list(os.environ):
        if name.startswith("TRINITY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TRINITY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TRINITY_TIME_SCALE", "60")
    s = Settings.from_env()
    assert s.data_dir == data_dir.resolve()
    assert s.time_scale == 60.0


def test_empty_or_blank_values_mean_the_default(data_dir: Path) -> None:
    env = dict.fromkeys(VARIABLES, "")
    env.update({"TRINITY_TIME_SCALE": "   ", "TRINITY_DATA_DIR": str(data_dir),
                "TRINITY_LOG_DIR": "", "TRINITY_RUN_DIR": ""})
    s = Settings.from_env(env)
    assert s == Settings(data_dir=data_dir, log_dir=data_dir / "logs" / "24h_test",
                         run_dir=data_dir / ".run")


def test_every_variable_is_parsed(data_dir: Path) -> None:
    env = {name: raw for name, (raw, _, _) in VARIABLES.items()}
    env.update({"TRINITY_DATA_DIR": str(data_dir), "TRINITY_LOG_DIR": "/var/tmp/trinity-logs",
                "TRINITY_RUN_DIR": "/tmp/tr-sockets"})
    s = Settings.from_env(env)
    for name, (_, field, value) in VARIABLES.items():
        assert getattr(s, field) == value, name
    assert s.data_dir == data_dir
    assert s.log_dir == Path("/var/tmp/trinity-logs")
    assert s.run_dir == Path("/tmp/tr-sockets")
    assert s.heartbeat_deadline_s == 0.25 * 5


def test_numbers_tolerate_surrounding_whitespace(data_dir: Path) -> None:
    s = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir), "TRINITY_TIME_SCALE": " 2.5 ",
                           "TRINITY_HEARTBEAT_MAX_MISSED": " 4\n"})
    assert (s.time_scale, s.heartbeat_max_missed) == (2.5, 4)


def test_relative_paths(data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir), "TRINITY_LOG_DIR": "my/logs",
                           "TRINITY_RUN_DIR": "sock"})
    assert s.log_dir == data_dir / "my" / "logs"  # relative to the data dir
    assert s.run_dir == (tmp_path / "sock").resolve()  # resolved from the working directory
    relative = Settings.from_env({"TRINITY_DATA_DIR": "data"})
    assert relative.data_dir == (tmp_path / "data").resolve()
    assert relative.data_dir.is_absolute()


def test_overrides_win_over_the_environment(data_dir: Path) -> None:
    env = {"TRINITY_DATA_DIR": str(data_dir), "TRINITY_TIME_SCALE": "2",
           "TRINITY_TEST_DURATION": "3", "TRINITY_EVENT_INTERVAL": "4"}
    s = Settings.from_env(env, time_scale=1440.0, duration_h=0.25, event_interval_min=None,
                          batch_size=7)
    assert s.time_scale == 1440.0
    assert s.duration_h == 0.25
    assert s.event_interval_min == 4.0  # None (an unset CLI flag) leaves the variable's value
    assert s.batch_size == 7


def test_an_override_can_repair_an_invalid_number_but_not_a_garbled_one(data_dir: Path) -> None:
    # Out of range in the environment, fixed by the flag: validation sees the final value.
    env = {"TRINITY_DATA_DIR": str(data_dir), "TRINITY_TIME_SCALE": "0"}
    assert Settings.from_env(env, time_scale=5.0).time_scale == 5.0
    # Not a number at all: reported even when a flag would override it.
    env["TRINITY_TIME_SCALE"] = "fast"
    with pytest.raises(ConfigError, match="TRINITY_TIME_SCALE"):
        Settings.from_env(env, time_scale=5.0)


def test_the_pattern_backend_is_sqlite_or_firestore_with_a_project(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TRINITY_DATA_DIR": str(data_dir), "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8080"}
    assert Settings.from_env(env).pattern_backend == "sqlite"
    firestore = {**env, "TRINITY_PATTERN_BACKEND": "Firestore", "GOOGLE_CLOUD_PROJECT": "p1"}
    settings = Settings.from_env(firestore)
    assert (settings.pattern_backend, settings.firestore_project) == ("firestore", "p1")
    with pytest.raises(ConfigError, match="needs GOOGLE_CLOUD_PROJECT"):
        Settings.from_env({**firestore, "GOOGLE_CLOUD_PROJECT": " "})
    with pytest.raises(ConfigError, match="TRINITY_PATTERN_BACKEND.*one of sqlite, firestore"):
        Settings.from_env({**env, "TRINITY_PATTERN_BACKEND": "mongodb"})
    # Real Firestore (no emulator) without credentials: the settings hold (they open
    # nothing), and `trinity run` says so before anything starts (its preflight asks the
    # check the Firestore client makes when it opens).
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(data_dir / "no-such-key.json"))
    real = Settings.from_env({**firestore, "FIRESTORE_EMULATOR_HOST": ""})
    with pytest.raises(ConfigError, match="no Google credentials.*FIRESTORE_EMULATOR_HOST"):
        preflight(real)
    preflight(settings)  # the emulator needs no credentials


def test_invalid_overrides_are_rejected(data_dir: Path) -> None:
    env = {"TRINITY_DATA_DIR": str(data_dir)}
    with pytest.raises(ConfigError, match="TRINITY_TIME_SCALE"):
        Settings.from_env(env, time_scale=0.0)
    with pytest.raises(ConfigError, match="TRINITY_TEST_DURATION"):
        Settings.from_env(env, duration_h=-1.0)
    with pytest.raises(ConfigError, match="poll_interval_s"):
        Settings.from_env(env, poll_interval_s=0)
    with pytest.raises(ConfigError, match="batch_size"):
        Settings.from_env(env, batch_size=0)


@pytest.mark.parametrize(("name", "raw"), INVALID)
def test_invalid_values_raise_config_error_naming_the_variable(
    name: str, raw: str, data_dir: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TRINITY_DATA_DIR": str(data_dir), name: raw})
    assert name in str(info.value)


@pytest.mark.parametrize("name", FLOAT_VARIABLES)
@settings(max_examples=60, deadline=None)
@given(raw=st.one_of(st.text(max_size=12), st.floats().map(repr)))
def test_any_float_text_is_accepted_or_rejected_by_name(name: str, raw: str) -> None:
    """Whatever the text, the outcome is a valid setting or a ConfigError naming the variable."""
    env = {"TRINITY_DATA_DIR": "/tmp/trs", name: raw}
    try:
        s = Settings.from_env(env)
    except ConfigError as exc:
        assert name in str(exc)
        return
    field = VARIABLES[name][1]
    value = getattr(s, field)
    assert 0 < value < float("inf")


@settings(max_examples=60, deadline=None)
@given(raw=st.one_of(st.text(max_size=12), st.integers(-(2**70), 2**70).map(str)))
def test_any_payload_limit_text_is_accepted_or_rejected_by_name(raw: str) -> None:
    name = "TRINITY_MAX_PAYLOAD_BYTES"
    try:
        s = Settings.from_env({"TRINITY_DATA_DIR": "/tmp/trs", name: raw})
    except ConfigError as exc:
        assert name in str(exc)
        return
    assert 1024 <= s.max_payload_bytes <= 64 << 20


def test_settings_are_frozen_and_replace_validates(data_dir: Path) -> None:
    s = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.time_scale = 2.0  # type: ignore[misc]
    assert s.replace(time_scale=60.0).time_scale == 60.0
    assert s.time_scale == 1.0
    with pytest.raises(ConfigError, match="TRINITY_HEARTBEAT_INTERVAL"):
        s.replace(heartbeat_interval_s=0.0)


# -- where the sockets go ----------------------------------------------------------

def test_run_dir_is_inside_a_short_data_dir() -> None:
    data_dir = Path("/" + "d" * 74)  # "/ddd…/.run" is exactly 80 characters
    s = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir)})
    assert s.run_dir == data_dir / ".run"
    assert len(str(s.run_dir)) == 80


@pytest.mark.parametrize("length", [76, 81, 120, 400])
def test_run_dir_falls_back_to_a_short_tmp_path_for_a_long_data_dir(length: int) -> None:
    data_dir = Path("/tmp/" + "x" * (length - len("/tmp/")))
    assert len(str(data_dir)) == length
    s = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir)})
    assert s.run_dir.parent == Path("/tmp")
    assert s.run_dir.name.startswith(f"trinity-{os.getuid()}-")
    assert len(str(s.run_dir)) <= 80
    # Room for "<run_dir>/controller.sock" under the ~107-byte unix socket limit.
    assert len(f"{s.run_dir}/architect.sock".encode()) < 100
    # The same data dir always gets the same folder; another data dir another one.
    assert Settings.from_env({"TRINITY_DATA_DIR": str(data_dir)}).run_dir == s.run_dir
    other = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir) + "2"})
    assert other.run_dir != s.run_dir


def test_a_long_data_dir_under_pytest_tmp_path_still_gets_short_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("nested-" * 12)
    s = Settings.from_env({"TRINITY_DATA_DIR": str(deep)})
    assert len(str(s.run_dir)) <= 80
    assert s.data_dir == deep


def test_an_explicit_run_dir_is_kept_even_for_a_long_data_dir() -> None:
    s = Settings.from_env({"TRINITY_DATA_DIR": "/tmp/" + "x" * 200, "TRINITY_RUN_DIR": "/tmp/trs"})
    assert s.run_dir == Path("/tmp/trs")


def test_an_explicit_run_dir_too_long_for_sockets_is_rejected_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="TRINITY_RUN_DIR"):
        Settings.from_env({"TRINITY_DATA_DIR": "/tmp/trs", "TRINITY_RUN_DIR": "/tmp/" + "r" * 120})
