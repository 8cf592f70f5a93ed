"""The benchmarks' cgroups (perf/cgroups.py): each run gets cgroups of its own."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[1] / "perf"
sys.path.insert(0, str(PERF))

from cgroups import CgroupJail, Limits  # noqa: E402

pytestmark = pytest.mark.skipif(not CgroupJail.available(), reason="cgroups v1 not writable here")

PREFIX = f"paycore-jail-test-{os.getpid()}"
LIMITS = [Limits("api", cpus=0.5, memory_bytes=64 * 1024 * 1024)]
LEFT_BYTES = 8 * 1024 * 1024


def in_jail(jail: CgroupJail, command: str) -> list[str]:
    """A shell that moves itself into the jail's cgroups, then runs command."""
    cpu, memory = jail.directories["api"]
    return ["sh", "-c", f"echo $$ > {cpu}/cgroup.procs && echo $$ > {memory}/cgroup.procs && {command}"]


def test_a_run_does_not_inherit_what_a_dead_run_left_charged():
    left = Path(tempfile.mkdtemp(prefix="paycore-jail-test-", dir="/dev/shm")) / "left-behind"
    dead_run = CgroupJail(LIMITS, PREFIX)
    try:
        # A process of the dead run writes to tmpfs and exits; the pages stay charged to its cgroup.
        subprocess.run(in_jail(dead_run, f"head -c {LEFT_BYTES} /dev/urandom > {left}"), check=True)
        assert dead_run.memory_usage()["api"] >= LEFT_BYTES
        # The dead run never closed its jail; the next run makes its own.
        next_run = CgroupJail(LIMITS, PREFIX)
        try:
            assert next_run.memory_usage()["api"] < LEFT_BYTES // 4
            memory = Path(next_run.directories["api"][1])
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(LIMITS[0].memory_bytes)
        finally:
            next_run.close()
    finally:
        left.unlink(missing_ok=True)
        left.parent.rmdir()
        dead_run.close()


def test_a_cgroup_still_holding_processes_is_refused():
    running = CgroupJail(LIMITS, PREFIX)
    holder = subprocess.Popen(in_jail(running, "echo in && exec sleep 60"), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"in\n"
        with pytest.raises(RuntimeError, match="still going"):
            CgroupJail(LIMITS, PREFIX)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        running.close()
