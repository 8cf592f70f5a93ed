"""GET /payments-summary while payments flow: the checker's window, asked
often enough to give a percentile, beside the final round's rate of posts.

The production topology (the load balancer and two instances, held where
cgroups allow to docker-compose.yml's limits, the emulated processors outside
them), its shared state on tmpfs and its data directory (journals, payments
record) on a disk, as docker-compose.yml has them. The load generator
(perf/loadgen.c) posts fresh payments at a constant rate (SUMMARY_RATE,
600/s) on keep-alive connections; meanwhile one client (http.client, one
keep-alive connection) asks a summary every SUMMARY_INTERVAL_MS (20), each
timed from before its write to after its whole answer is read, taking turns
between two ranges: the checker's window, [now - 15 s, now - 2 s], and the
last hour, [now - 1 h + 7 ms, now - 2 s] (its start not on a 10 ms
boundary, so its first milliseconds are summed from payments rows). Prints
one JSON object: per range the summary latency percentiles (ms), and the
POSTs'.

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
# Range name -> (from, to) before now, in ms.
RANGES = {"checker": (15_000, 2_000), "hour": (3_600_000 - 7, 2_000)}


def time_summaries(port: int, seconds: float, interval_s: float) -> tuple[dict[str, list[int]], list[str]]:
    """µs per summary of each range, one every interval_s, the ranges in
    turn; failures."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    latencies_us: dict[str, list[int]] = {name: [] for name in RANGES}
    failures = []
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    turn = 0
    while next_at < deadline:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval_s
        name = list(RANGES)[turn % len(RANGES)]
        turn += 1
        now_ms = time.time_ns() // 1_000_000
        from_before, to_before = RANGES[name]
        path = "/payments-summary" + range_query(now_ms - from_before, now_ms - to_before)
        started = time.perf_counter_ns()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        elapsed_us = (time.perf_counter_ns() - started) // 1000
        if response.status == 200:
            latencies_us[name].append(elapsed_us)
        else:
            failures.append(f"{name}: status {response.status}")
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
    print(json.dumps({"seconds": args.seconds, "rate": rate,
                      "summary_ms": {name: latency_summary_ms(samples) for name, samples in summaries_us.items()},
                      "summaries": {name: len(samples) for name, samples in summaries_us.items()},
                      "post_ms": posts, "failed": failures[:5]}))


if __name__ == "__main__":
    main()
