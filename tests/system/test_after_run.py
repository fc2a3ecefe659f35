"""``trinity run --tag``: a real compressed run (2 simulated hours at 2880x) that passes
tags HEAD of a real git repository once its results are printed, and drafts no bug
report. What the tag and the draft hold is tests/controller/ops/test_after_run.py."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import Project


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.timeout(300)
def test_a_passing_run_tags_the_repository_after_its_results(project: Project,
                                                             tmp_path: Path) -> None:
    for who in ("AUTHOR", "COMMITTER"):
        project.env[f"GIT_{who}_NAME"] = "Trinity Test"
        project.env[f"GIT_{who}_EMAIL"] = "test@trinity.invalid"
    repo = tmp_path / "code"
    repo.mkdir()
    (repo / "README").write_text("code under test\n")
    for args in (("init", "-q"), ("add", "README"), ("commit", "-q", "-m", "first")):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                       env=project.env)

    days = {datetime.now(UTC).strftime("%Y%m%d")}
    result = project.trinity("run", "--duration", "2", "--time-scale", "2880", "--tag",
                             str(repo), timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = result.stdout.splitlines()
    summary = lines.index("mandatory criteria: all passed")
    tags = _git(repo, "tag", "--list").split()
    assert len(tags) == 1, out
    assert lines[summary + 1] == (f"tagged {_git(repo, 'rev-parse', 'HEAD')[:12]} (HEAD of "
                                  f"{repo}) as {tags[0]}, not pushed")
    days.add(datetime.now(UTC).strftime("%Y%m%d"))  # the run may end past midnight
    assert tags[0] in {f"trinity-24h-validated-{day}" for day in days}
    assert _git(repo, "cat-file", "-t", tags[0]) == "tag"
    started = re.search(r"^run (\S+) started", result.stdout, re.MULTILINE)
    assert started is not None, out
    run_id = started.group(1)
    assert f"run {run_id}" in _git(repo, "tag", "--list", "--format=%(contents)", tags[0])
    assert not list((project.root / "logs" / "24h_test").glob("bug_report_*"))
