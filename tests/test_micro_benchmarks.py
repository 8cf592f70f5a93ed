"""Micro-benchmarks in perf/ that drive the service's own classes (through
stand-ins for their neighbours, or a scratch Redis) break silently when an
interface changes: these three had. Run briefly, each must still run and
print its figures."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent.parent / "perf"
LATENCY_ROWS = ("tmpfs, written on the loop", "disk, writer thread", "disk, writer thread, sync",
                "disk, the device alone: pwrite + fdatasync")
COST_ROWS = ("tmpfs", "disk", "disk, sync")


def test_the_journal_benchmark_times_each_place_and_the_device(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(PERF / "bench_journal.py")], capture_output=True, text=True,
                         timeout=120,
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


def test_the_http_benchmark_drives_the_protocol_as_the_service_does() -> None:
    """Its stand-ins for the routes and the journal follow the protocol's
    interfaces: with another revision it answers each request once, or fails."""
    run = subprocess.run([sys.executable, str(PERF / "bench_http.py"), "--against", "HEAD"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HTTP_BENCH_ROUNDS": "200"})
    assert run.returncode == 0, run.stderr
    ratio = next(line for line in run.stdout.splitlines() if "ratio" in line)
    assert float(ratio.split("takes ")[1].split("x")[0]) > 0, ratio


def test_the_redis_store_benchmark_runs_against_the_store_as_it_is() -> None:
    run = subprocess.run([sys.executable, str(PERF / "bench_redis_store.py"), "--payments", "300",
                          "--history", "300"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summaries = [line for line in run.stdout.splitlines() if line.startswith("summary, ")]
    assert len(summaries) == 5 and all("median" in line for line in summaries), run.stdout
