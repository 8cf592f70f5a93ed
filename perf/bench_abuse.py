"""POST /payments latency alone and beside hostile clients, side by side.

The production topology (perf/abuse.py: the load balancer and two instances,
held to docker-compose.yml's limits where cgroups allow), virtual users posting
at a steady pace; each round times them alone, then beside connections that
pipeline without reading and slowloris connections. Prints each round and the
medians over the rounds.

Run: .venv/bin/python perf/bench_abuse.py [--rounds 3] [--seconds 30] [--pipelining 200] [--slowloris 200]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from abuse import abuse_round, production_stack  # noqa: E402

PERCENTILES = (50, 90, 99, 99.9)


def main() -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--rounds", type=int, default=3)
    arguments.add_argument("--seconds", type=float, default=30, help="of each phase, alone and abused")
    arguments.add_argument("--users", type=int, default=50)
    arguments.add_argument("--per-user-per-s", type=float, default=4)
    arguments.add_argument("--pipelining", type=int, default=200)
    arguments.add_argument("--slowloris", type=int, default=200)
    options = arguments.parse_args()
    rows: dict[str, list[list[float]]] = {"alone": [], "abused": []}
    failed = 0
    with production_stack("paycore-bench-abuse") as (stack, memory_limits):
        for index in range(options.rounds):
            result = abuse_round(stack, quiet_s=options.seconds, abuse_s=options.seconds, users=options.users,
                                 per_user_per_s=options.per_user_per_s, pipelining=options.pipelining,
                                 slowloris=options.slowloris)
            for name, times in (("alone", result.quiet), ("abused", result.abused)):
                rows[name].append([times.percentile_ms(p) for p in PERCENTILES])
                failed += len(times.failures)
            print(f"round {index + 1}: p50/p90/p99/p99.9 ms alone "
                  f"{' / '.join(f'{v:.2f}' for v in rows['alone'][-1])}, abused "
                  f"{' / '.join(f'{v:.2f}' for v in rows['abused'][-1])}; failed {len(result.quiet.failures)} + "
                  f"{len(result.abused.failures)} of {len(result.quiet.latencies_s) + len(result.abused.latencies_s)}; "
                  f"hostile connections {result.hostile.connections}; peak RSS MB {result.peak_rss_mb} "
                  f"(limits MB { {s: round(b / 2**20) for s, b in memory_limits.items()} }); ended {result.ended}",
                  flush=True)
            if result.ended:
                failed += 1
                break
    print(f"\nmedians of {len(rows['alone'])} rounds ({options.users} users x {options.per_user_per_s}/s, "
          f"{options.seconds:.0f} s each; {options.pipelining} pipelining + {options.slowloris} slowloris):")
    print(f"{'':>8} " + " ".join(f"{'p' + str(p):>8}" for p in PERCENTILES))
    for name, values in rows.items():
        print(f"{name:>8} " + " ".join(f"{statistics.median(column):8.2f}" for column in zip(*values)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
