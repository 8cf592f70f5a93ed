"""How many payments a processor emulator takes per second on one CPU: the C one
(perf/processor.c) and the Python one (paycore.emulator), one after the other.

The load generator posts fresh payments straight to the emulator as fast as 64
keep-alive connections allow (closed loop, no think time), the emulator pinned
to CPU 0 and the generator to CPU 1. What counts is what the emulator stored,
by its own admin summary. The generator, one thread, may be the limit: the
emulator's CPU per payment gives what one CPU of it would take. Its RSS
afterwards gives the bytes it keeps per payment, and a summary over a range
holding all of them how fast it stays.
Run: .venv/bin/python perf/bench_processor.py [SECONDS]   (default 10)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_processor import FastProcessor  # noqa: E402
from native import build_tools  # noqa: E402
from scenario import HttpJson, Processors, range_query  # noqa: E402
from usage import process_usage, resident_bytes  # noqa: E402

from paycore.emulator import EmulatorProcess  # noqa: E402

CONNECTIONS = 64
EMULATOR_CPU, GENERATOR_CPU = 0, 1
REQUESTED_AT = "2025-07-15T12:00:00.000Z"
REQUESTED_AT_MS = 1_752_580_800_000


def measure(name: str, pid: int, url: str, loadgen: Path, seconds: float) -> dict:
    os.sched_setaffinity(pid, {EMULATOR_CPU})
    cpu_before = process_usage(pid)[0]
    rss_before = resident_bytes(pid)
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        finished = subprocess.run(
            ["taskset", "-c", str(GENERATOR_CPU), str(loadgen), "--target", url.removeprefix("http://"),
             "--duration", f"{seconds:g}", "--max-vus", str(CONNECTIONS), "--start-vus", str(CONNECTIONS),
             "--think-ms", "0", "--requested-at", REQUESTED_AT, "--out", out.name],
            check=True, capture_output=True, text=True)
    generator = json.loads(finished.stdout.strip().splitlines()[-1])
    stored = Processors(url, url).summary()["default"]["totalRequests"]
    cpu_s = process_usage(pid)[0] - cpu_before
    admin = HttpJson(url, {"X-Rinha-Token": "123"})
    _, in_range, range_summary_s = admin.call(
        "GET", "/admin/payments-summary" + range_query(REQUESTED_AT_MS - 1, REQUESTED_AT_MS + 1))
    assert in_range["totalRequests"] == stored, in_range
    cpu_us = cpu_s * 1e6 / stored
    return {"emulator": name, "stored_per_s": round(stored / generator["duration_s"]),
            "answers_2xx": generator["ok_2xx"], "stored": stored,
            "emulator_cpu_s": round(cpu_s, 2), "cpu_us_per_payment": round(cpu_us, 1),
            "per_cpu_second": round(1e6 / cpu_us), "range_summary_ms": round(range_summary_s * 1000, 3),
            "p50_ms": generator["p50_us"] / 1000, "p99_ms": generator["p99_us"] / 1000,
            "rss_bytes_per_payment": round((resident_bytes(pid) - rss_before) / stored, 1)}


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    tools = build_tools()
    results = []
    with FastProcessor(tools["processor"]) as fast:
        results.append(measure("C (perf/processor.c)", fast.pid, fast.url, tools["loadgen"], seconds))
    with EmulatorProcess() as python:
        results.append(measure("Python (paycore.emulator)", python._process.pid, python.url, tools["loadgen"],
                               seconds))
    print(f"{'emulator':<27} {'stored':>10} {'stored/s':>9} {'CPU µs/payment':>15} {'per CPU s':>10} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'RSS B/payment':>14} {'range summary ms':>17}")
    for result in results:
        print(f"{result['emulator']:<27} {result['stored']:>10,} {result['stored_per_s']:>9,} "
              f"{result['cpu_us_per_payment']:>15} {result['per_cpu_second']:>10,} {result['p50_ms']:>7.3f} "
              f"{result['p99_ms']:>7.3f} {result['rss_bytes_per_payment']:>14} {result['range_summary_ms']:>17}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
