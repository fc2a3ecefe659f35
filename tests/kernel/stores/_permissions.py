"""The stores' files and their modes: shared by the unit tests of the stores' permissions
(tests/kernel/stores/test_permissions.py) and the supervised run that checks them
(tests/system/test_security.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

STORES = ("trinity_messages.db", "trinity_costs.db", "trinity_patterns.db")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def store_files(folder: Path) -> dict[str, int]:
    """The mode of each store file in ``folder``: databases, their -wal and -shm files, the
    FAISS index (whichever exist)."""
    names = [f"{db}{suffix}" for db in STORES for suffix in ("", "-wal", "-shm")]
    names.append("trinity_patterns.faiss")
    return {name: mode_of(folder / name) for name in names if (folder / name).exists()}
