"""``trinity schedule``: the plan's test cadence as systemd user units and cron lines.

The plan runs a 2-hour smoke test every week and the full 24-hour run every month. For
a project folder this module writes, per cadence, a ``trinity-<kind>.service`` (a
oneshot that runs ``trinity run --duration H`` in the folder, then the run's report and
``trinity trends``, whatever the run's result) and a ``trinity-<kind>.timer`` (weekly /
monthly, ``Persistent=true`` so a run missed while the machine was off starts at the
next boot), and the equivalent crontab lines. Runs write to the project's
``logs/24h_test``; each new run moves the previous one to ``logs/archive/<run id>``,
which is where ``trinity trends`` reads them.

A smoke test due while the monthly run still goes on finds supervisord running and
refuses to start (``trinity run`` exits 1, its unit fails): the runs never overlap.

Errors: ``ScheduleError`` (a ``TrinityError``) with a one-line message for a project
folder that is missing or not a Trinity project, a ``trinity`` executable that cannot
be found and a unit folder that cannot be written.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trinity.contract import CONTROLLER
from trinity.controller.reports.trends import FULL, FULL_HOURS, SMOKE, SMOKE_HOURS
from trinity.errors import TrinityError

SUPERVISOR_CONFIG = "supervisor.conf"
UNIT_PREFIX = "trinity"
# Where the scheduled runs' own output goes, relative to the project folder.
SCHEDULE_LOG = "logs/schedule.log"
TRENDS_OUTPUT = "reports/trends"


class ScheduleError(TrinityError):
    """The schedule cannot be made; the message says why in one line."""


@dataclass(frozen=True)
class Cadence:
    kind: str
    hours: float
    description: str
    on_calendar: str  # systemd.time(7)
    cron: str         # crontab(5): minute hour day-of-month month day-of-week


# Weekly on Monday at 03:00; monthly on the 1st at 06:00, so that on a Monday the 1st
# the smoke test (03:00-05:00) is over before the full run starts.
CADENCES = (
    Cadence(SMOKE, SMOKE_HOURS, f"weekly {SMOKE_HOURS:g}-hour smoke test",
            "Mon *-*-* 03:00:00", "0 3 * * 1"),
    Cadence(FULL, FULL_HOURS, f"monthly full {FULL_HOURS:g}-hour run",
            "*-*-01 06:00:00", "0 6 1 * *"),
)


@dataclass(frozen=True)
class Schedule:
    project: Path
    trinity: Path  # the executable the units run
    units: dict[str, str]  # file name -> contents
    cron_lines: tuple[str, ...]

    @property
    def timers(self) -> list[str]:
        return [name for name in self.units if name.endswith(".timer")]

    def enable_command(self) -> str:
        return "systemctl --user daemon-reload && systemctl --user enable --now " + " ".join(
            self.timers)


def check_project(project: Path) -> Path:
    """The project folder, resolved; a missing one or one without Trinity's supervisord
    config is a ScheduleError."""
    if not project.exists():
        raise ScheduleError(f"project folder {project} does not exist")
    if not project.is_dir():
        raise ScheduleError(f"{project} is not a folder")
    config = project / SUPERVISOR_CONFIG
    parser = configparser.RawConfigParser()
    try:
        read = parser.read(config, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ScheduleError(f"{config} is not a supervisord config: "
                            f"{str(exc).splitlines()[0]}") from None
    if not read or not parser.has_section(f"program:{CONTROLLER}"):
        raise ScheduleError(f"{project} is not a Trinity project (no {SUPERVISOR_CONFIG} "
                            f"declaring the {CONTROLLER} program)")
    return project.resolve()


def find_trinity() -> Path:
    """The ``trinity`` executable of this installation (beside the interpreter), else the
    one on the PATH."""
    beside = Path(sys.executable).parent / "trinity"
    if beside.exists():
        return beside
    found = shutil.which("trinity")
    if found is None:
        raise ScheduleError("cannot find the trinity executable (not beside "
                            f"{sys.executable}, not on the PATH)")
    return Path(found)


def _commands(project: Path, trinity: Path, hours: float) -> list[list[str]]:
    """The run, its report, then the trends across runs."""
    exe = str(trinity)
    return [[exe, "run", "--duration", f"{hours:g}"],
            [exe, "report", "--input", str(project / "logs" / "24h_test")],
            [exe, "trends", "--input", str(project / "logs"),
             "--output", str(project / TRENDS_OUTPUT)]]


def _path_env(trinity: Path) -> str:
    # supervisord's programs find `trinity` on the PATH it was started with.
    return f"{trinity.parent}:/usr/local/bin:/usr/bin:/bin"


def _systemd_quote(arg: str) -> str:
    """An ExecStart argument: quoted when it holds a space or a quote; ``%`` and ``$``
    doubled/escaped so systemd passes them through."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'\\"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def service_unit(project: Path, trinity: Path, cadence: Cadence) -> str:
    run, report, trends = (" ".join(_systemd_quote(a) for a in c)
                           for c in _commands(project, trinity, cadence.hours))
    return "\n".join([
        "[Unit]",
        f"Description=Trinity {cadence.description} in {project}",
        "",
        "[Service]",
        "Type=oneshot",
        # A path setting is taken literally (no quotes), only specifiers expand.
        f"WorkingDirectory={str(project).replace('%', '%%')}",
        f"Environment={_systemd_quote('TRINITY_DATA_DIR=' + str(project))}",
        f"Environment={_systemd_quote('PATH=' + _path_env(trinity))}",
        f"ExecStart={run}",
        # Run whatever the result; "-": a report that cannot be made does not hide the
        # run's own exit status.
        f"ExecStopPost=-{report}",
        f"ExecStopPost=-{trends}",
        # A run lasts its duration in real time: no start timeout.
        "TimeoutStartSec=infinity",
        "",
    ])


def timer_unit(project: Path, cadence: Cadence) -> str:
    return "\n".join([
        "[Unit]",
        f"Description=Trinity {cadence.description} in {project}",
        "",
        "[Timer]",
        f"OnCalendar={cadence.on_calendar}",
        "Persistent=true",
        f"Unit={UNIT_PREFIX}-{cadence.kind}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def cron_line(project: Path, trinity: Path, cadence: Cadence) -> str:
    run, report, trends = (shlex.join(c) for c in _commands(project, trinity, cadence.hours))
    line = (f"{cadence.cron} cd {shlex.quote(str(project))} && "
            f"export PATH={shlex.quote(_path_env(trinity))} "
            f"TRINITY_DATA_DIR={shlex.quote(str(project))} && "
            f"{{ {run}; code=$?; {report}; {trends}; exit $code; }} "
            f">> {shlex.quote(str(project / SCHEDULE_LOG))} 2>&1")
    return line.replace("%", "\\%")  # cron turns an unescaped % into a newline


def make_schedule(project: Path, trinity: Path | None = None) -> Schedule:
    """The units and cron lines for the project folder ``project``."""
    project = check_project(project)
    exe = trinity or find_trinity()
    units: dict[str, str] = {}
    for cadence in CADENCES:
        units[f"{UNIT_PREFIX}-{cadence.kind}.service"] = service_unit(project, exe, cadence)
        units[f"{UNIT_PREFIX}-{cadence.kind}.timer"] = timer_unit(project, cadence)
    return Schedule(project, exe, units, tuple(cron_line(project, exe, c) for c in CADENCES))


def default_unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def install(schedule: Schedule, unit_dir: Path) -> list[Path]:
    """Write the unit files into ``unit_dir`` (created); returns their paths."""
    written = []
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        for name, text in schedule.units.items():
            path = unit_dir / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise ScheduleError(f"cannot write the units into {unit_dir}: {exc}") from None
    return written


def user_systemd_running() -> bool:
    """Whether a systemd user manager answers (not in most containers and CI runners)."""
    if shutil.which("systemctl") is None:
        return False
    try:
        state = subprocess.run(["systemctl", "--user", "is-system-running"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return state.stdout.strip() in ("running", "degraded")


def enable(schedule: Schedule) -> str | None:
    """Reload the user manager and enable the timers; None when done, else why not."""
    for args in (["daemon-reload"], ["enable", "--now", *schedule.timers]):
        done = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                              timeout=30)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return None
