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

LEFT_BYTES = 8 * 1024 * 1024


def test_a_run_does_not_inherit_what_a_dead_run_left_charged(tmp_path):
    prefix = f"paycore-jail-test-{os.getpid()}"
    limits = [Limits("api", cpus=0.5, memory_bytes=64 * 1024 * 1024)]
    left = Path(tempfile.mkdtemp(prefix="paycore-jail-test-", dir="/dev/shm")) / "left-behind"
    dead_run = CgroupJail(limits, prefix)
    try:
        # A process of the dead run writes to tmpfs and exits; the pages stay charged to its cgroup.
        cpu, memory = dead_run.directories["api"]
        subprocess.run(["sh", "-c", f"echo $$ > {cpu}/cgroup.procs && echo $$ > {memory}/cgroup.procs"
                                    f" && head -c {LEFT_BYTES} /dev/urandom > {left}"], check=True)
        assert dead_run.memory_usage()["api"] >= LEFT_BYTES
        # The dead run never closed its jail; the next run makes its own.
        next_run = CgroupJail(limits, prefix)
        try:
            assert next_run.memory_usage()["api"] < LEFT_BYTES // 4
            assert (Path(memory) / "memory.limit_in_bytes").read_text().strip() == str(limits[0].memory_bytes)
        finally:
            next_run.close()
    finally:
        left.unlink(missing_ok=True)
        left.parent.rmdir()
        dead_run.close()


def test_a_cgroup_still_holding_processes_is_refused():
    prefix = f"paycore-jail-test-{os.getpid()}"
    limits = [Limits("api", cpus=0.5, memory_bytes=64 * 1024 * 1024)]
    running = CgroupJail(limits, prefix)
    cpu, memory = running.directories["api"]
    holder = subprocess.Popen(["sh", "-c", f"echo $$ > {cpu}/cgroup.procs && echo $$ > {memory}/cgroup.procs"
                                           " && echo in && exec sleep 60"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"in\n"
        with pytest.raises(RuntimeError, match="still going"):
            CgroupJail(limits, prefix)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        running.close()
