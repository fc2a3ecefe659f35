"""Whole-file writes that a reader never sees half done."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to a hidden temporary file beside ``path`` and rename it over
    ``path`` (mode 0644: mkstemp's 0600 would hide it from other local users). With
    ``durable`` the data is fsynced before the rename, so a crash leaves the old file
    or the new one, never an empty one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
