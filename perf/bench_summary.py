"""GET /payments-summary while payments flow: the checker's window, asked
often enough to give a percentile, beside the final round's rate of posts.

The production topology (the load balancer and two instances, held where
cgroups allow to docker-compose.yml's limits, the emulated processors outside
them), its shared state on tmpfs and its data directory (journals, payments
record) on a disk, as docker-compose.yml has them. The load generator
(perf/loadgen.c) posts fresh payments at a constant rate (SUMMARY_RATE,
600/s) on keep-alive connections; meanwhile one client (http.client, one keep-alive connection) asks the
summary of [now - 15 s, now - 2 s], as the checker does, every
SUMMARY_INTERVAL_MS (20), each timed from before its write to after its
whole answer is read. Prints one JSON object: summary and POST latency
percentiles (ms) and counts.

    .venv/bin/python perf/bench_summary.py [--seconds 30]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import time
from pathlib import Path

from abuse import production_stack
from native import build_tools
from open_loop import OpenLoopLoad
from report import latency_summary_ms, read_requests, success_latencies_ms
from scenario import range_query

USERS = 60
WINDOW_FROM_MS, WINDOW_TO_MS = 15_000, 2_000


def time_summaries(port: int, seconds: float, interval_s: float) -> tuple[list[int], list[str]]:
    """µs per summary of the checker's window, one every interval_s; failures."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    latencies_us, failures = [], []
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < deadline:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval_s
        now_ms = time.time_ns() // 1_000_000
        path = "/payments-summary" + range_query(now_ms - WINDOW_FROM_MS, now_ms - WINDOW_TO_MS)
        started = time.perf_counter_ns()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        elapsed_us = (time.perf_counter_ns() - started) // 1000
        if response.status == 200:
            latencies_us.append(elapsed_us)
        else:
            failures.append(f"status {response.status}")
    connection.close()
    return latencies_us, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    rate = float(os.environ.get("SUMMARY_RATE", "600"))
    interval_s = float(os.environ.get("SUMMARY_INTERVAL_MS", "20")) / 1000
    loadgen = build_tools()["loadgen"]
    with tempfile.TemporaryDirectory() as scratch, production_stack("paycore-summary-bench") as (stack, _):
        out = Path(scratch) / "posts.csv"
        load = OpenLoopLoad(loadgen, stack.port, rate, args.seconds + 2, USERS, USERS, out=out)
        time.sleep(1)  # the posts flow before the first summary
        summaries_us, failures = time_summaries(stack.port, args.seconds, interval_s)
        load.wait()
        posts, _ = success_latencies_ms(read_requests(out))
    print(json.dumps({"seconds": args.seconds, "rate": rate, "summary_ms": latency_summary_ms(summaries_us),
                      "summaries": len(summaries_us), "post_ms": posts, "failed": failures[:5]}))


if __name__ == "__main__":
    main()
