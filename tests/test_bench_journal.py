"""perf/bench_journal.py drives the journal as the service writes it: run
briefly, it prints a latency row for each place and the device, and a cost
row for each place, all of them numbers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "perf" / "bench_journal.py"
LATENCY_ROWS = ("tmpfs, written on the loop", "disk, writer thread", "disk, writer thread, sync",
                "disk, the device alone: pwrite + fdatasync")
COST_ROWS = ("tmpfs", "disk", "disk, sync")


def test_the_journal_benchmark_times_each_place_and_the_device(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JOURNAL_BATCHES": "20", "JOURNAL_DISK_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for name in LATENCY_ROWS:
        figures = next(line for line in lines if line.startswith(name))[len(name):].split()
        assert len(figures) == 3 and all(float(figure) >= 0 for figure in figures), figures
    costs = lines[lines.index(next(line for line in lines if line.startswith("back to back"))) + 1:]
    assert [line[:12].strip() for line in costs] == list(COST_ROWS)
    for line in costs:
        assert all(float(figure) > 0 for figure in line[12:].split())
    assert not any(tmp_path.iterdir()), "the scratch directories are removed"
