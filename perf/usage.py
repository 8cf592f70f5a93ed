"""What a process or a directory uses, read from /proc and the filesystem."""
from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def process_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds so far, peak RSS in bytes) of a live process."""
    return cpu_seconds(Path(f"/proc/{pid}/stat").read_text()), _status_kb(pid, "VmHWM:") * 1024


def cpu_seconds(stat: str) -> float:
    """User and system CPU seconds in the text of a /proc stat file (a
    process's, or a thread's under /proc/<pid>/task)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def resident_bytes(pid: int) -> int:
    """RSS of a live process now."""
    return _status_kb(pid, "VmRSS:") * 1024


def _status_kb(pid: int, field: str) -> int:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(field))


def directory_bytes(path: Path) -> int:
    """Bytes the files under path occupy (allocated blocks, as du counts them: a
    sparse or preallocated file counts what it holds, not its length)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
