"""glibc's malloc knobs: fewer arenas, and free heap pages handed back to the system.

Memory is a benchmark target (400 MB for every process together): a process that
freed what a burst of work allocated keeps the pages unless trimmed. Elsewhere than
glibc (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _glibc() -> Any:
    """The C library if it is glibc (it has ``malloc_trim``), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process (call it before starting threads).

    Model calls run in a call thread (see ``BaseProcess.wait_for``), a new one after a
    call that timed out; a thread started while an older one still runs gets an arena
    of its own, and every arena keeps what grammar sampling left in it. Two arenas: the
    main thread's and one that all call threads share.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system.

    Grammar checks allocate many small blocks while a call runs (up to ~35 MB when a
    step checks the whole 49k-token vocabulary, see ``_GrammarMask``) and free them at
    its end; glibc keeps the pages, so without this a process holding a model stays that
    much higher after a call, and as much again for every malloc arena a call thread
    lands in.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
