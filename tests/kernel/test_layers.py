"""The layers hold (import-linter's contracts in pyproject.toml), and break when crossed.

The contracts are checked on the installed layout (``trinity.agents`` is the ``agents/``
folder, and so on), so each test assembles that layout in a temporary folder, as
``pip install`` would, and runs ``lint-imports`` on it: once as it is, and once with a
deliberate violation of each contract added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The project's folders as the installed package lays them out (pyproject's package-dir).
LAYOUT = {"trinity": "trinity", "agents": "trinity/agents", "bus": "trinity/bus",
          "controller": "trinity/controller"}


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    for source, target in LAYOUT.items():
        shutil.copytree(ROOT / source, tmp_path / target,
                        ignore=shutil.ignore_patterns("__pycache__", "data"))
    return tmp_path


def lint_imports(layout: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return subprocess.run([str(BIN / "lint-imports"), str(ROOT / "pyproject.toml")],
                          cwd=layout, env=env, capture_output=True, text=True, timeout=120)


def add_import(layout: Path, module: str, statement: str) -> None:
    path = layout / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = layout / module.replace(".", "/") / "__init__.py"
    path.write_text(path.read_text() + f"\n{statement}  # a deliberate violation\n")


def test_the_tree_keeps_every_contract(layout: Path) -> None:
    result = lint_imports(layout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "statement", "contract"), [
    # the kernel imports nothing above it
    ("trinity.clock", "import trinity.bus.message", "CLI > agents | controller > bus > kernel"),
    # the bus knows nothing of the agents or the controller
    ("trinity.bus.node", "import trinity.controller.process.rules",
     "CLI > agents | controller > bus > kernel"),
    # agents and controller never import each other
    ("trinity.controller.process.controller", "import trinity.agents.witness.store",
     "CLI > agents | controller > bus > kernel"),
    # no CLI code below the CLI
    ("trinity.agents.architect", "import trinity.cli.common",
     "CLI > agents | controller > bus > kernel"),
    # reports import only the kernel
    ("trinity.controller.reports.export", "import trinity.controller.ops.run",
     "Reports read the stores through the kernel only"),
    ("trinity.controller.reports.criteria", "import trinity.bus.journal",
     "Reports read the stores through the kernel only"),
    ("trinity.agents.witness.knowledge", "import trinity.agents.models.router",
     "WITNESS and the model calls are independent"),
])
def test_a_deliberate_violation_breaks_its_contract(layout: Path, module: str, statement: str,
                                                   contract: str) -> None:
    add_import(layout, module, statement)
    result = lint_imports(layout)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout


def test_a_module_outside_every_layer_is_refused(layout: Path) -> None:
    """A new kernel module must be placed in the layers (exhaustive), or lint says so."""
    (layout / "trinity" / "helpers.py").write_text('"""Unplaced."""\n')
    result = lint_imports(layout)
    assert result.returncode != 0
    assert "helpers" in result.stdout
