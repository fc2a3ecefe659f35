"""The install checks of ``trinity doctor`` against installs that are not this one: a
dependency missing or at a refused version, a Python older than the project needs."""

from __future__ import annotations

from importlib import metadata

import pytest

from trinity.contract.finding import FAIL, PASS
from trinity.controller.ops import doctor


def _declaring(monkeypatch: pytest.MonkeyPatch, *requirements: str) -> None:
    real = metadata.requires

    def requires(name: str) -> list[str] | None:
        return list(requirements) if name == doctor.DISTRIBUTION else real(name)

    monkeypatch.setattr(metadata, "requires", requires)


def test_every_dependency_of_this_install_passes() -> None:
    finding = doctor.check_packages()
    assert finding.status == PASS, finding
    assert finding.detail.startswith("all ") and "dependencies installed" in finding.detail


def test_a_missing_dependency_fails_and_says_make_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _declaring(monkeypatch, "click>=8.1", "no-such-distribution-xyz>=1.0",
               'pytest>=8; extra == "test"')
    finding = doctor.check_packages()
    assert finding.status == FAIL
    assert finding.detail == "1 of 2 dependencies not usable: no-such-distribution-xyz missing"
    assert finding.fix.startswith("run `make install`")


def test_a_dependency_at_a_refused_version_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    _declaring(monkeypatch, "click>=999")
    finding = doctor.check_packages()
    assert finding.status == FAIL
    assert f"click {metadata.version('click')} (needs >=999)" in finding.detail


def test_a_python_older_than_required_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.platform, "python_version", lambda: "3.10.4")
    finding = doctor.check_python()
    assert finding.status == FAIL
    assert "Python 3.10.4" in finding.detail and "needs >=3.11" in finding.detail
    assert "PYTHON=python3.11" in finding.fix
