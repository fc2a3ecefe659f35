"""What ``pip install`` ships: every package folder of the project is listed in
pyproject.toml (it lists them by hand, the top-level folders being mapped into one
``trinity`` namespace), so a new package cannot be left out of an installed Trinity."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    found = set()
    for package, folder in mapping.items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            parts = init.parent.relative_to(root).parts
            found.add(".".join((package, *parts)))
    data = {f"{package}.data" for package in mapping if (ROOT / mapping[package] / "data").is_dir()}
    assert found | data == set(setuptools["packages"])
