"""Threads named for the operating system too: Python names its threads for
itself only, so `top -H`, perf and /proc/<pid>/task/*/comm would show every
thread of an instance as "python"."""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

PR_SET_NAME = 15
# The kernel keeps 15 bytes of a thread's name (and a NUL).
OS_NAME_BYTES = 15

_libc = ctypes.CDLL(None, use_errno=True)


def start_named_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread running target, named `name` (at most 15 bytes, so the
    operating system keeps it whole) for Python and the operating system alike."""
    os_name = name.encode()
    if len(os_name) > OS_NAME_BYTES:
        raise ValueError(f"a thread's name has at most {OS_NAME_BYTES} bytes: {name!r}")

    def run() -> None:
        _libc.prctl(PR_SET_NAME, os_name, 0, 0, 0)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
