"""After a run: a passing run tags HEAD of a real git repository (annotated, dated by the
run's end, ``-2`` for the next one that day, never moved); a failing run is not tagged
and leaves a bug-report draft with the failed criterion, the first alerts, the log lines
around them and the configuration without secrets; bad input is one line, no traceback.

The runs are built through the project's own writers (``build_run`` of the report tests).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import ROOT
from tests.controller.reports._report import invoke as invoke_report
from tests.controller.reports.test_report import Plan, build_run
from trinity.cli import main
from trinity.controller.ops import after_run
from trinity.controller.ops import run as runner
from trinity.logs import JsonFormatter
from trinity.redaction import Redactor
from trinity.settings import Settings
from trinity.stores import run_logs, runs

# A key as a user's environment would hold it, and a secret-named variable of Trinity's.
FAKE_KEY = "sk-test-after-run-0123456789abcdef"
FAKE_TOKEN = "tok-after-run-9f8e7d6c5b4a"
# A secret an older test_config.json holds in the clear and this environment does not:
# only withholding it by its name keeps it out of the draft.
OLD_PASSWORD = "pw-of-another-shell-4711"


@pytest.fixture
def settings(short_dir: Path) -> Settings:
    return Settings.from_env({"TRINITY_DATA_DIR": str(short_dir)})


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real git repository with one commit; git's identity from the environment, so
    the test does not depend on the machine's configuration."""
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Trinity Test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@trinity.invalid")
    path = tmp_path / "code"
    path.mkdir()
    (path / "README").write_text("code under test\n")
    for args in (("init", "-q"), ("add", "README"), ("commit", "-q", "-m", "first")):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)
    return path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def ended(settings: Settings, run: runs.Run) -> runs.Run:
    """The run as the journal holds it once finished (with its end time)."""
    from trinity.db import reading

    with reading(settings.messages_db) as conn:
        found = runs.get_run(conn, run.run_id)
    assert found is not None and found.ended_ms is not None
    return found


def day(run: runs.Run) -> str:
    assert run.ended_ms is not None
    return datetime.fromtimestamp(run.ended_ms / 1000, UTC).strftime("%Y%m%d")


# -- a passing run is tagged -------------------------------------------------------------

def test_a_passing_run_tags_head_annotated_with_the_run_and_its_criteria(
        settings: Settings, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = ended(settings, build_run(settings, Plan()))
    code = after_run.conclude(settings.replace(tag_repo=repo), run, 0)
    out = capsys.readouterr().out
    name = f"trinity-24h-validated-{day(run)}"
    assert code == 0, out
    assert git(repo, "tag", "--list") == name
    assert git(repo, "cat-file", "-t", name) == "tag"  # annotated, not lightweight
    assert git(repo, "rev-parse", f"{name}^{{commit}}") == git(repo, "rev-parse", "HEAD")
    message = git(repo, "tag", "--list", "--format=%(contents)", name)
    assert message.startswith(f"Trinity 24-hour test passed: run {run.run_id}")
    assert "Mandatory criteria: 6 of 6 passed" in message
    assert "PASS  Zero Crashes" in message
    assert out.strip() == (f"tagged {git(repo, 'rev-parse', 'HEAD')[:12]} (HEAD of {repo}) "
                           f"as {name}, not pushed")
    assert not list(settings.log_dir.glob("bug_report_*"))
    assert git(repo, "remote") == ""  # nothing to push to, and nothing was configured


def test_a_second_pass_the_same_day_gets_a_suffix_and_moves_no_tag(
        settings: Settings, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = ended(settings, build_run(settings, Plan()))
    tagging = settings.replace(tag_repo=repo)
    assert after_run.conclude(tagging, run, 0) == 0
    first = f"trinity-24h-validated-{day(run)}"
    first_commit = git(repo, "rev-parse", f"{first}^{{commit}}")
    (repo / "README").write_text("changed\n")
    git(repo, "commit", "-q", "-am", "second")
    assert after_run.conclude(tagging, run, 0) == 0
    assert after_run.conclude(tagging, run, 0) == 0
    assert git(repo, "tag", "--list").split() == [first, f"{first}-2", f"{first}-3"]
    assert git(repo, "rev-parse", f"{first}^{{commit}}") == first_commit
    assert git(repo, "rev-parse", f"{first}-2^{{commit}}") == git(repo, "rev-parse", "HEAD")
    assert f"as {first}-3, not pushed" in capsys.readouterr().out


def test_tag_names_follow_the_utc_day_and_skip_taken_suffixes() -> None:
    ms = int(datetime(2026, 3, 1, 23, 59, tzinfo=UTC).timestamp() * 1000)
    base = "trinity-24h-validated-20260301"
    assert after_run.tag_name(ms, ()) == base
    assert after_run.tag_name(ms, [base]) == f"{base}-2"
    assert after_run.tag_name(ms, [base, f"{base}-2", f"{base}-4"]) == f"{base}-3"
    assert after_run.tag_name(ms, ["trinity-24h-validated-20260228"]) == base


def test_uncommitted_changes_are_said_in_the_tag_and_the_output(
        settings: Settings, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = ended(settings, build_run(settings, Plan()))
    (repo / "README").write_text("edited, not committed\n")
    assert after_run.conclude(settings.replace(tag_repo=repo), run, 0) == 0
    name = f"trinity-24h-validated-{day(run)}"
    assert "uncommitted changes" in git(repo, "tag", "--list", "--format=%(contents)", name)
    assert capsys.readouterr().out.strip().endswith("the working tree has uncommitted changes")


# -- a failing run is not tagged and leaves a draft ----------------------------------------

def _write_logs(settings: Settings, crash_ms: int) -> Path:
    """``trinity.log`` (through the project's formatter) and witness's supervisord log
    around the crash: lines a second apart, some before it and some after; the supervisord
    log ends with a raw traceback line, as Python prints one before logging is set up,
    carrying the key unredacted."""
    config = settings.data_dir / "supervisor.conf"
    shutil.copy(ROOT / "supervisor.conf", config)
    formatter = JsonFormatter("witness", Redactor(()))
    program_log = settings.data_dir / "logs" / "supervisor" / "witness.log"
    program_log.parent.mkdir(parents=True, exist_ok=True)
    shared, own = [], []
    for offset in range(-8, 6):
        record = logging.makeLogRecord({"msg": f"shared line at {offset:+d} s", "name": "t",
                                        "levelname": "INFO"})
        record.created = (crash_ms + offset * 1000) / 1000
        shared.append(formatter.format(record))
        record.msg = f"witness line at {offset:+d} s"
        own.append(formatter.format(record))
    own.insert(8, f"RuntimeError: provider rejected key {FAKE_KEY}")
    (settings.log_dir / run_logs.TRINITY_LOG).write_text("\n".join(shared) + "\n")
    program_log.write_text("\n".join(own) + "\n")
    return config


def test_a_failing_run_is_not_tagged_and_its_draft_has_what_an_issue_needs(
        settings: Settings, repo: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("TRINITY_SERVICE_TOKEN", FAKE_TOKEN)
    run = ended(settings, build_run(settings, Plan(crash=True)))
    crash = next(a for a in run_logs.read_alerts(settings.log_dir / run_logs.ALERTS_LOG)
                 if a["kind"] == "agent_crashed")
    config = _write_logs(settings, crash["ts_ms"])
    runner.write_test_config(settings, run, config, resumed=False)
    # an older writer's test_config.json, a secret in the clear: the draft withholds it
    written = json.loads((settings.log_dir / run_logs.TEST_CONFIG).read_text())
    assert written["environment"]["TRINITY_SERVICE_TOKEN"] == "[redacted]"
    written["environment"]["TRINITY_DB_PASSWORD"] = OLD_PASSWORD
    (settings.log_dir / run_logs.TEST_CONFIG).write_text(json.dumps(written))

    code = after_run.conclude(settings.replace(tag_repo=repo), run, 1, config)
    out = capsys.readouterr().out
    draft = settings.log_dir / f"bug_report_{run.run_id}.md"
    assert code == 1
    assert git(repo, "tag", "--list") == ""
    assert out.splitlines() == [f"bug report draft: {draft}",
                                f"not tagged: run {run.run_id} did not pass"]
    text = draft.read_text()
    assert text.startswith(f"# Trinity 24-hour test failed: run {run.run_id}")
    assert "Failed mandatory criteria: Zero Crashes." in text
    assert "| Zero Crashes | mandatory | 1 unexpected exits | 0 unexpected exits |" in text
    # the first alerts, in time order, with time and agent
    backlog = text.index("| 1 | ")
    crash_row = text.index("| 2 | ")
    assert backlog < crash_row
    assert "| warning | queue_backlog | - | queue improvement_queue has 51 pending" \
        in text[backlog:crash_row]
    when = datetime.fromtimestamp(crash["ts_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert (f"| 2 | {when} | - | critical | agent_crashed | witness | witness exited "
            "unexpectedly (pid 4242, from RUNNING) |") in text
    # around the crash: five lines before it and three from it on, from both logs
    excerpt = text[text.index(f"### 2. {when}: critical agent_crashed [witness]"):]
    excerpt = excerpt[:excerpt.index("## Configuration")]
    shown = [f"shared line at {s:+d} s" for s in range(-5, 3)]
    assert all(line in excerpt for line in shown), excerpt
    assert "shared line at -6 s" not in excerpt and "shared line at +3 s" not in excerpt
    assert f"`{settings.data_dir / 'logs' / 'supervisor' / 'witness.log'}`:" in excerpt
    assert "witness line at -1 s" in excerpt
    assert "RuntimeError: provider rejected key [redacted]" in excerpt
    # the configuration, secrets withheld
    assert f'"run_id": "{run.run_id}"' in text
    assert '"TRINITY_SERVICE_TOKEN": "[redacted]"' in text
    assert '"TRINITY_DB_PASSWORD": "[redacted]"' in text
    assert FAKE_KEY not in text and FAKE_TOKEN not in text and OLD_PASSWORD not in text
    assert FAKE_KEY[3:] not in text

    # trinity report names the draft, in one line
    result = invoke_report(settings.data_dir, "--output", str(settings.data_dir / "r.md"))
    assert result.exit_code == 0, result.output
    assert f"bug report draft: {draft}" in result.output.splitlines()


def test_excerpts_take_lines_before_and_after_each_time_in_one_pass() -> None:
    lines: list[tuple[int | None, str]] = [(t, f"at {t}") for t in range(0, 100, 10)]
    lines.insert(5, (40, "traceback line without a time"))  # carries the time before it
    found = after_run.excerpts(lines, [45, 5, 1000, -1], before=2, after=2)
    assert found[0] == ["at 40", "traceback line without a time", "at 50", "at 60"]
    assert found[1] == ["at 0", "at 10", "at 20"]
    assert found[2] == ["at 80", "at 90"]  # after the last line: the lines before it
    assert found[3] == ["at 0", "at 10"]


def test_a_draft_without_logs_or_config_is_still_written(
        settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    run = ended(settings, build_run(settings, Plan(crash=True)))
    (settings.log_dir / run_logs.TEST_CONFIG).write_text('{"run_id": ')  # torn
    assert after_run.conclude(settings, run, 1, settings.data_dir / "no-such.conf") == 1
    text = (settings.log_dir / f"bug_report_{run.run_id}.md").read_text()
    assert "(no line logged)" in text
    assert "test_config.json` is missing or unreadable" in text
    assert capsys.readouterr().out.startswith("bug report draft: ")


# -- bad input: one line, a non-zero exit, no traceback -----------------------------------

@pytest.mark.parametrize("what", ["plain folder", "missing", "a file", "no commit"])
def test_a_path_that_cannot_be_tagged_is_one_line_and_exit_1(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        what: str) -> None:
    run = ended(settings, build_run(settings, Plan()))
    target = tmp_path / "target"
    if what == "plain folder":
        target.mkdir()
    elif what == "a file":
        target.write_text("not a repository")
    elif what == "no commit":
        subprocess.run(["git", "init", "-q", str(target)], check=True)
    code = after_run.conclude(settings.replace(tag_repo=target), run, 0)
    out = capsys.readouterr().out
    assert code == 1
    assert len(out.splitlines()) == 1 and out.startswith(f"cannot tag {target}: "), out
    expected = {"plain folder": "not a git repository", "missing": "no such directory",
                "a file": "not a directory", "no commit": "has no commit yet"}[what]
    assert expected in out


def test_git_missing_is_one_line_and_exit_1(
        settings: Settings, repo: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = ended(settings, build_run(settings, Plan()))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert after_run.conclude(settings.replace(tag_repo=repo), run, 0) == 1
    assert capsys.readouterr().out == f"cannot tag {repo}: git is not installed (not on the " \
                                      "PATH)\n"


def test_tag_with_detach_is_a_usage_error_and_the_setting_is_documented(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--detach", "--tag", str(tmp_path)],
                                prog_name="trinity",
                                env={"TRINITY_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert "--tag needs a foreground run" in result.output
    assert "Traceback" not in result.output
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "--tag PATH" in help_text and "TRINITY_TAG_REPO" in help_text
    assert Settings.from_env({"TRINITY_DATA_DIR": str(tmp_path),
                              "TRINITY_TAG_REPO": "code"}).tag_repo == Path("code").resolve()
