"""Micro-benchmarks in perf/ that drive the service's own classes (through
stand-ins for their neighbours, or a scratch Redis) break silently when an
interface changes: three had. Run briefly, each must still run and print its
figures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
PERF = REPOSITORY / "perf"
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


def run_benchmark(*arguments: str, **environment: str) -> list[str]:
    run = subprocess.run([sys.executable, str(PERF / arguments[0]), *arguments[1:]], capture_output=True,
                         text=True, timeout=180, env={**os.environ, **environment})
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def figure_after(lines: list[str], prefix: str, marker: str) -> float:
    line = next(line for line in lines if line.strip().startswith(prefix))
    return float(line.split(marker, 1)[1].split()[0].rstrip("x"))


def test_the_recent_ledger_benchmark_reads_both_ways_and_rebuilds() -> None:
    """Its answers through the recent ledger and through the record's
    statement are checked equal before they are timed."""
    report = json.loads(run_benchmark("bench_recent_ledger.py", RECENT_RATE="10", RECENT_QUERIES="30")[-1])
    assert report["payments"] == 36_000 and report["rebuild_s"] > 0
    for name in ("checker_recent_us", "checker_record_us", "hour_recent_us", "hour_record_us",
                 "hour_recent_beside_commits_us"):
        assert 0 < report[name]["p50"] <= report[name]["p99"], (name, report[name])


def test_the_parser_benchmark_times_the_compiled_parser_beside_orjson() -> None:
    lines = run_benchmark("bench_parser.py", PARSER_ROUNDS="2000")
    assert figure_after(lines, "cython parser:", "median") > 0
    assert figure_after(lines, "orjson + checks:", "median") > 0
    assert figure_after(lines, "ratio:", "takes") > 0


def test_the_client_benchmark_sends_through_both_clients() -> None:
    lines = run_benchmark("bench_client.py", CLIENT_PAYMENTS="200", CLIENT_ROUNDS="1")
    for client in ("paycore client:", "aiohttp:"):
        assert figure_after(lines, client, client) > 0
    assert figure_after(lines, "ratio:", "spends") > 0


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("taskset") is None,
                    reason="gcc builds the C emulator and the load generator; taskset pins them")
def test_the_processor_benchmark_loads_both_emulators() -> None:
    results = json.loads(run_benchmark("bench_processor.py", "1")[-1])
    assert [result["emulator"] for result in results] == ["C (perf/processor.c)", "Python (paycore.emulator)"]
    for result in results:
        assert result["stored"] > 0 and result["cpu_us_per_payment"] > 0, result


def fixed_size_table_in_history() -> bool:
    """The baseline is built from an old commit: a shallow clone may not hold it."""
    found = subprocess.run(["git", "log", "-1", "--format=%H", "-S", "ID_FULL", "--", "pyx/accepted_ids.pyx"],
                           cwd=REPOSITORY, capture_output=True, text=True)
    return found.returncode == 0 and bool(found.stdout.strip())


@pytest.mark.skipif(not fixed_size_table_in_history(), reason="the fixed-size table's commit is not in this clone")
def test_the_accepted_ids_benchmark_measures_the_window_beside_the_fixed_table() -> None:
    lines = run_benchmark("bench_accepted_ids.py", "--capacity", "250000")
    assert lines[0].startswith("window: capacity 250,000 ids"), lines
    assert lines[1].startswith("fixed: 524,288 slots"), lines
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert float(rows["new"][0]) > 0 and float(rows["new"][1]) > 0
    assert float(rows["duplicate"][0]) > 0 and float(rows["duplicate"][1]) > 0
    assert float(rows["confirm"][0]) > 0 and rows["confirm"][1] == "nan"
