"""Hostile clients against the production topology (the load balancer and two
instances, each held where cgroups allow to docker-compose.yml's CPU and
memory limits): 200 connections pipelining without reading and 200 slowloris
connections, while virtual users post payments at a steady pace. No payment
may fail, no instance may pass its memory limit or die; the payments' p99 with
and without the abuse is printed (perf/bench_abuse.py measures it longer)."""
from __future__ import annotations

import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[1] / "perf"
sys.path.insert(0, str(PERF))

from abuse import abuse_round, production_stack  # noqa: E402

USERS = 20
PER_USER_PER_S = 5


def test_pipelining_and_slowloris_clients_leave_payments_served_and_memory_bounded(capsys):
    with production_stack("paycore-abuse-test") as (stack, memory_limits):
        result = abuse_round(stack, quiet_s=4, abuse_s=10, users=USERS, per_user_per_s=PER_USER_PER_S,
                             pipelining=200, slowloris=200)
    with capsys.disabled():
        print(f"\nabuse: POST /payments p99 {result.quiet.percentile_ms(99):.2f} ms alone "
              f"({len(result.quiet.latencies_s)} payments), {result.abused.percentile_ms(99):.2f} ms beside "
              f"200 pipelining + 200 slowloris connections ({len(result.abused.latencies_s)} payments; "
              f"{result.hostile.connections} hostile connections opened); slowest "
              f"{result.abused.percentile_ms(100):.1f} ms; peak RSS MB {result.peak_rss_mb}")
    assert not result.ended, f"{result.ended} ended (killed for passing the memory limit?)"
    assert not result.quiet.failures and not result.abused.failures, result.abused.failures[:5]
    # Every payment was made: the pace held (a user waits for its answer before the next).
    assert len(result.abused.latencies_s) >= 0.9 * USERS * PER_USER_PER_S * 10
    for service, peak_mb in result.peak_rss_mb.items():
        assert peak_mb * 1024 * 1024 < memory_limits[service], (service, peak_mb)
    # The hostile clients did their part: reconnected after the instances dropped them.
    assert result.hostile.connections > 400
