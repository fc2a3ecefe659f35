"""After a run, the test plan's post-test actions: a run that passed tags the code under
test, a run that failed leaves a bug-report draft beside its logs.

* :func:`tag_validated`: an annotated tag ``trinity-24h-validated-YYYYMMDD`` (the UTC date
  the run ended; ``-2``, ``-3`` for further passing runs that day, so an earlier tag is
  never moved) on HEAD of the repository named by ``--tag`` / ``TRINITY_TAG_REPO``,
  through the ``git`` command. Its message names the run and every criterion as
  measured. Nothing is pushed: publishing the tag is the user's decision.
* :func:`write_bug_report`: ``bug_report_<run id>.md`` in the run's log folder: the
  failed criteria (measured against target), the first alerts, the lines of
  ``trinity.log`` and of the alerting program's supervisord log around each of them, and
  the run's configuration, as Markdown to paste into an issue tracker. Every line is
  redacted (``trinity/redaction.py``): the values of secret-named variables of the
  environment and ``sk-`` keys never reach the draft.
* :func:`conclude`: what ``trinity run`` does once its results are printed.

Errors: :class:`TagError` (a ``TrinityError``) with a one-line message: git missing, a
path that is no git repository or one without a commit, ``git tag`` refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trinity.clock import now_ms
from trinity.contract import PROGRAMS
from trinity.controller.reports import criteria
from trinity.controller.reports.criteria import Criterion
from trinity.errors import ConfigError, TrinityError
from trinity.redaction import Redactor, withhold_secrets
from trinity.settings import Settings
from trinity.stores import run_logs, runs

TAG_PREFIX = "trinity-24h-validated-"
# The draft shows the first alerts of the run above "info" (deliberate kills, budget
# steps), each with this many log lines before and after its time.
FIRST_ALERTS = 10
LINES_BEFORE = 5
LINES_AFTER = 3
# A rendered log line is cut here, a traceback to its last lines: enough to recognise
# the failure, short enough to paste.
MAX_LINE_CHARS = 600
MAX_TRACEBACK_LINES = 20
GIT_TIMEOUT_S = 30.0


class TagError(TrinityError):
    """The validated code could not be tagged; the message is one line."""


# -- the tag ---------------------------------------------------------------------------

def tag_name(ended_ms: int, taken: Iterable[str]) -> str:
    """``trinity-24h-validated-YYYYMMDD`` for the UTC day of ``ended_ms``, or the first of
    ``-2``, ``-3``... not in ``taken``."""
    base = TAG_PREFIX + datetime.fromtimestamp(ended_ms / 1000, UTC).strftime("%Y%m%d")
    existing = set(taken)
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"


def tag_message(run: runs.Run, measured: Sequence[Criterion]) -> str:
    mandatory = [c for c in measured if c.mandatory]
    performance = [c for c in measured if not c.mandatory]
    ended = _utc(run.ended_ms) if run.ended_ms else "-"
    return "\n".join([
        f"Trinity 24-hour test passed: run {run.run_id}",
        "",
        f"Run {run.run_id} {run.status}, ended {ended}: "
        f"{run.sim_elapsed_s / 3600:g} simulated hours at time scale {run.time_scale:g}.",
        f"Mandatory criteria: {sum(c.passed for c in mandatory)} of {len(mandatory)} passed; "
        f"performance criteria: {sum(c.passed for c in performance)} of {len(performance)} "
        "passed.",
        "",
        *criteria.format_table(list(measured)),
        "",
    ])


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TagError(f"cannot run git in {repo}: {exc}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def tag_validated(repo: Path, run: runs.Run, measured: Sequence[Criterion]) -> str:
    """Tag HEAD of ``repo`` as validated by ``run``; returns the line that says so.

    Raises :class:`TagError` with a one-line message."""
    if shutil.which("git") is None:
        raise TagError(f"cannot tag {repo}: git is not installed (not on the PATH)")
    if not repo.is_dir():
        raise TagError(f"cannot tag {repo}: "
                       f"{'not a directory' if repo.exists() else 'no such directory'}")
    if _git(repo, "rev-parse", "--git-dir").returncode != 0:
        raise TagError(f"cannot tag {repo}: not a git repository")
    head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if head.returncode != 0:
        raise TagError(f"cannot tag {repo}: the repository has no commit yet")
    commit = head.stdout.strip()
    ended_ms = run.ended_ms or now_ms()
    message = tag_message(run, measured)
    changes = _git(repo, "status", "--porcelain", "--untracked-files=no")
    dirty = changes.returncode == 0 and bool(changes.stdout.strip())
    if dirty:
        message += ("\nThe working tree had uncommitted changes to tracked files: this tag "
                    "names HEAD, not them.\n")
    # Another tagger may take the name between the listing and the tag: list again.
    for _ in range(3):
        listed = _git(repo, "tag", "--list", f"{tag_name(ended_ms, ())}*")
        name = tag_name(ended_ms, listed.stdout.split())
        made = _git(repo, "tag", "-a", name, "-m", message, commit)
        if made.returncode == 0:
            note = "; the working tree has uncommitted changes" if dirty else ""
            return f"tagged {commit[:12]} (HEAD of {repo}) as {name}, not pushed{note}"
        if "already exists" not in made.stderr:
            break
    raise TagError(f"cannot tag {repo}: git tag {name}: {_last_line(made.stderr)}")


# -- the bug-report draft --------------------------------------------------------------

def bug_report_path(log_dir: Path, run_id: str) -> Path:
    return log_dir / f"bug_report_{run_id}.md"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell(value: Any) -> str:
    """Text safe in a Markdown table cell: one line, no column-breaking pipe."""
    return " ".join(str(value).split()).replace("|", r"\|") if value not in (None, "") \
        else "-"


def _fenced(lines: Sequence[str], info: str = "") -> list[str]:
    """A code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, *lines, fence]


def _log_ms(entry: Mapping[str, Any]) -> int | None:
    try:
        return round(datetime.fromisoformat(str(entry["ts"])).timestamp() * 1000)
    except (KeyError, ValueError, OverflowError):
        return None


def _render(line: str) -> tuple[int | None, str]:
    """A log line's time (None: not a JSON line of ``trinity/logs.py``) and its text for a
    reader: time, level, process and message, the other fields as JSON, the traceback's
    last lines indented below."""
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if not isinstance(entry, dict) or "msg" not in entry:
        return None, line.rstrip()[:MAX_LINE_CHARS]
    extras = {k: v for k, v in entry.items()
              if k not in ("ts", "level", "process", "logger", "msg", "exc")}
    text = (f"{entry.get('ts', '?')} {entry.get('level', '')} {entry.get('process', '')} "
            f"{entry['msg']}" + (f" {json.dumps(extras, default=str)}" if extras else ""))
    text = " ".join(text.split())[:MAX_LINE_CHARS]
    exc = str(entry.get("exc") or "").splitlines()[-MAX_TRACEBACK_LINES:]
    return _log_ms(entry), "\n".join([text, *(f"    {x}" for x in exc)])


def _timed_lines(paths: Sequence[Path]) -> Iterator[tuple[int | None, str]]:
    """Every line of ``paths`` in order, rendered; a line without a time of its own
    (a traceback printed raw) carries the last time seen."""
    last: int | None = None
    for path in paths:
        try:
            with path.open(encoding="utf-8", errors="replace") as fh:
                for raw in fh:
                    if not raw.strip():
                        continue
                    ms, text = _render(raw)
                    last = ms if ms is not None else last
                    yield last, text
        except OSError:
            continue


def excerpts(lines: Iterable[tuple[int | None, str]], times_ms: Sequence[int], *,
             before: int = LINES_BEFORE, after: int = LINES_AFTER) -> list[list[str]]:
    """For each of ``times_ms``, the ``before`` lines logged before it and the ``after``
    lines from it on, in one pass over ``lines`` (time, text) in log order."""
    order = sorted(range(len(times_ms)), key=lambda i: times_ms[i])
    found: list[list[str]] = [[] for _ in times_ms]
    recent: deque[str] = deque(maxlen=before)
    open_windows: list[list[int]] = []  # [alert index, lines still to take]
    reached = 0
    for ms, text in lines:
        while reached < len(order) and ms is not None and ms >= times_ms[order[reached]]:
            found[order[reached]] = list(recent)
            open_windows.append([order[reached], after])
            reached += 1
        for window in open_windows:
            if window[1] > 0:
                found[window[0]].append(text)
                window[1] -= 1
        open_windows = [w for w in open_windows if w[1] > 0]
        recent.append(text)
        if reached == len(order) and not open_windows:
            break
    for index in order[reached:]:  # after the log's last line: the lines that precede
        found[index] = list(recent)
    return found


def program_logs(config: Path | None) -> dict[str, list[Path]]:
    """Each program's supervisord log (stdout, stderr redirected into it), rotated
    backups first, as supervisord's own parser reads ``config``; empty if it cannot."""
    if config is None or not config.is_file():
        return {}
    from trinity.controller.ops.doctor import supervisord_options

    try:
        options = supervisord_options(config)
    except ConfigError:
        return {}
    found: dict[str, list[Path]] = {}
    for group in options.process_group_configs:
        for proc in group.process_configs:
            logfile = getattr(proc, "stdout_logfile", None)
            if isinstance(logfile, str) and proc.name in PROGRAMS:
                path = Path(logfile)
                backups = int(getattr(proc, "stdout_logfile_backups", 0) or 0)
                rotated = [path.with_name(f"{path.name}.{n}") for n in range(backups, 0, -1)]
                found[proc.name] = [p for p in [*rotated, path] if p.exists()]
    return found


def _alert_ms(alert: Mapping[str, Any]) -> int:
    ts = alert.get("ts_ms")
    return ts if isinstance(ts, int) else 0


def _first_alerts(log_dir: Path, run: runs.Run) -> tuple[list[dict[str, Any]], int, int]:
    """The first alerts above info in time order, how many there are, how many info."""
    alerts = sorted(criteria.run_alerts(log_dir, run, run.ended_ms), key=_alert_ms)
    shown = [a for a in alerts if a.get("severity") != "info"]
    return shown[:FIRST_ALERTS], len(shown), len(alerts) - len(shown)


def _criteria_section(measured: Sequence[Criterion] | None) -> list[str]:
    if measured is None:
        return ["The criteria could not be evaluated (see `trinity run`'s output).", ""]
    failed = [c for c in measured if not c.passed]
    if not failed:
        return ["Every criterion passed; the run itself did not complete (see above).", ""]
    return ["| criterion | kind | measured | target |", "| --- | --- | --- | --- |",
            *(f"| {_cell(c.name)} | {'mandatory' if c.mandatory else 'performance'} | "
              f"{_cell(c.measured)} | {_cell(c.target)} |" for c in failed), ""]


def _alerts_section(alerts: Sequence[dict[str, Any]], total: int, info: int,
                    log_dir: Path) -> list[str]:
    if not alerts:
        return [f"No warning or critical alert in `{log_dir / run_logs.ALERTS_LOG}`"
                f"{f' ({info} info alerts)' if info else ''}.", ""]
    lines = [f"The first {len(alerts)} of {total} warning, error and critical alerts, in time "
             f"order{f' ({info} info alerts not shown)' if info else ''}; all of them are in "
             f"`{log_dir / run_logs.ALERTS_LOG}`.", "",
             "| # | time (UTC) | simulated h | severity | kind | agent | message |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, alert in enumerate(alerts, 1):
        ts, sim = alert.get("ts_ms"), alert.get("sim_elapsed_s")
        lines.append(
            f"| {n} | {_utc(ts) if isinstance(ts, int) else '-'} | "
            f"{f'{sim / 3600:.2f}' if isinstance(sim, int | float) else '-'} | "
            f"{_cell(alert.get('severity'))} | {_cell(alert.get('kind'))} | "
            f"{_cell(alert.get('agent'))} | {_cell(alert.get('message'))} |")
    return [*lines, ""]


def _excerpts_section(alerts: Sequence[dict[str, Any]], log_dir: Path,
                      programs: Mapping[str, list[Path]]) -> list[str]:
    timed = [(n, a) for n, a in enumerate(alerts, 1) if isinstance(a.get("ts_ms"), int)]
    if not timed:
        return []
    times = [int(a["ts_ms"]) for _, a in timed]
    shared = log_dir / run_logs.TRINITY_LOG
    from_shared = excerpts(_timed_lines([shared]), times)
    by_agent: dict[str, list[list[str]]] = {}
    for agent in {str(a.get("agent")) for _, a in timed if a.get("agent") in programs}:
        mine = [i for i, (_, a) in enumerate(timed) if a.get("agent") == agent]
        found = excerpts(_timed_lines(programs[agent]), [times[i] for i in mine])
        by_agent[agent] = [found[mine.index(i)] if i in mine else [] for i in range(len(timed))]
    lines = [f"Up to {LINES_BEFORE} lines before each alert's time and {LINES_AFTER} from it "
             f"on, from `{shared}` and from the supervisord log of the alert's agent; "
             "secrets redacted.", ""]
    for i, (n, alert) in enumerate(timed):
        alerting = alert.get("agent")
        lines += [f"### {n}. {_utc(times[i])}: {alert.get('severity')} {alert.get('kind')}"
                  f"{f' [{alerting}]' if alerting else ''}", ""]
        sources = [(shared, from_shared[i])]
        if isinstance(alerting, str) and alerting in by_agent:
            sources.append((programs[alerting][-1], by_agent[alerting][i]))
        for path, excerpt in sources:
            lines.append(f"`{path}`:")
            lines += [*_fenced(excerpt or ["(no line logged)"]), ""]
    return lines


def _config_section(log_dir: Path) -> list[str]:
    document = run_logs.read_json(log_dir / run_logs.TEST_CONFIG)
    if document is None:
        return [f"`{log_dir / run_logs.TEST_CONFIG}` is missing or unreadable.", ""]
    env = document.get("environment")
    if isinstance(env, dict):  # written redacted; withheld again, whoever wrote it
        document["environment"] = withhold_secrets({str(k): str(v) for k, v in env.items()})
    return [f"From `{log_dir / run_logs.TEST_CONFIG}`, secrets withheld:", "",
            *_fenced(json.dumps(document, indent=2, default=str).splitlines(), "json"), ""]


def bug_report(settings: Settings, run: runs.Run, measured: Sequence[Criterion] | None,
               config: Path | None = None) -> str:
    """The draft's Markdown, redacted with this process's environment."""
    log_dir = settings.log_dir
    alerts, total, info = _first_alerts(log_dir, run)
    failed = [c.name for c in measured or () if c.mandatory and not c.passed]
    ended = f"ended {_utc(run.ended_ms)}" if run.ended_ms else "has not ended"
    if config is None:
        recorded = (run_logs.read_json(log_dir / run_logs.TEST_CONFIG) or {}).get(
            "supervisor_config")
        config = Path(recorded) if isinstance(recorded, str) else None
    lines = [
        f"# Trinity 24-hour test failed: run {run.run_id}", "",
        f"Run `{run.run_id}` {run.status}, {ended}, after "
        f"{run.sim_elapsed_s / 3600:.2f} of {run.duration_s / 3600:g} simulated hours at "
        f"time scale {run.time_scale:g}."
        + (f" Failed mandatory criteria: {', '.join(failed)}." if failed else ""), "",
        f"- logs: `{log_dir}`",
        f"- full report: `trinity report --input {log_dir} --run {run.run_id}`", "",
        "## Failed criteria", "", *_criteria_section(measured),
        "## First alerts", "", *_alerts_section(alerts, total, info, log_dir),
    ]
    excerpt_lines = _excerpts_section(alerts, log_dir, program_logs(config))
    if excerpt_lines:
        lines += ["## Log excerpts", "", *excerpt_lines]
    lines += ["## Configuration", "", *_config_section(log_dir)]
    return Redactor.from_env()("\n".join(lines))


def write_bug_report(settings: Settings, run: runs.Run, measured: Sequence[Criterion] | None,
                     config: Path | None = None) -> Path:
    path = bug_report_path(settings.log_dir, run.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bug_report(settings, run, measured, config), encoding="utf-8")
    return path


# -- after trinity run -----------------------------------------------------------------

def conclude(settings: Settings, run: runs.Run, code: int, config: Path | None = None) -> int:
    """Once ``trinity run`` has printed its results (``code`` 0: the run passed): tag the
    code under test if asked and the run passed, draft the bug report if it failed.
    Returns the command's exit code: ``code``, or 1 when tagging failed."""
    measured: list[Criterion] | None
    try:
        _, measured = criteria.evaluate(settings, run.run_id)
    except (sqlite3.Error, ConfigError, OSError):  # _summarize has said why
        measured = None
    repo = settings.tag_repo
    if code != 0:
        try:
            print(f"bug report draft: {write_bug_report(settings, run, measured, config)}")
        except (OSError, sqlite3.Error, ValueError) as exc:
            print(f"cannot write the bug report draft: {exc}")
        if repo is not None:
            print(f"not tagged: run {run.run_id} did not pass")
        return code
    if repo is None:
        return code
    if measured is None:
        print(f"cannot tag {repo}: the criteria of run {run.run_id} could not be evaluated")
        return 1
    try:
        print(tag_validated(Path(os.path.abspath(repo)), run, measured))
    except TagError as exc:
        print(exc)
        return 1
    return code
