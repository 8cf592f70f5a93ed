"""The benchmark's arithmetic: percentiles, per-window percentiles, the
challenge's score (SPEC §5), and the instances' events read from their metrics."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

from cgroups import memory_bytes  # noqa: E402
from report import Request, latencies_by_connection_ms, percentile, score, window_percentiles  # noqa: E402
from service_events import Scrape, ServiceEvents, parse_exposition  # noqa: E402


def test_percentile_interpolates_between_ranks():
    values = list(range(1, 101))
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(values, 1.0) == 100
    assert percentile([], 0.99) == 0.0


def test_requests_are_split_by_whether_they_opened_their_connection():
    requests = [Request(0, 400, 202, 410, True), Request(1, 100, 202, 110, False),
                Request(2, 300, 202, 300, False), Request(3, 900, 0, 900, True)]
    split = latencies_by_connection_ms(requests)
    assert split["new_connection"]["max"] == 0.4  # the failed one is left out
    assert split["reused_connection"]["p50"] == 0.2 and split["reused_connection"]["max"] == 0.3


def test_score_as_the_challenge_computes_it():
    processed = {"default": {"totalRequests": 1000, "totalAmount": 20050.0},
                 "fallback": {"totalRequests": 100, "totalAmount": 2005.0}}
    result = score(p99_ms=1.004, processed=processed, inconsistencies=0, successful_posts=1100)
    fees = 20050.0 * 0.07 + 2005.0 * 0.10
    assert result["p99"]["valor"] == "1.0ms" and result["p99"]["bonus"] == 0.2
    assert result["total_taxas"] == pytest.approx(fees)
    assert result["total_liquido"] == pytest.approx((22055.0 - fees) * 1.2, abs=0.01)
    assert result["lag"]["lag"] == 0 and result["multa"]["porcentagem"] == 0


def test_any_inconsistency_costs_35_percent_and_slow_p99_earns_no_bonus():
    processed = {"default": {"totalRequests": 10, "totalAmount": 200.5},
                 "fallback": {"totalRequests": 0, "totalAmount": 0}}
    result = score(p99_ms=12.0, processed=processed, inconsistencies=1, successful_posts=12)
    assert result["p99"]["bonus"] == 0
    assert result["multa"]["porcentagem"] == 0.35
    assert result["total_liquido"] == pytest.approx(200.5 * 0.93 * 0.65, abs=0.01)
    assert result["lag"]["lag"] == 2


@pytest.mark.parametrize("text, size", [("150MB", 150 * 2**20), ("40m", 40 * 2**20), ("1.5G", 3 * 2**29),
                                        ("512", 512)])
def test_compose_memory_sizes(text, size):
    assert memory_bytes(text) == size


def test_window_percentiles_leave_failed_requests_and_empty_windows_out():
    requests = [Request(1_000_000, 100, 202, 100, False), Request(9_000_000, 300, 202, 300, False),
                Request(12_000_000, 5_000, 0, 5_000, False), Request(25_000_000, 200, 202, 200, False)]
    assert window_percentiles(requests, 1.0) == [(0.0, 0.3), (20.0, 0.2)]


def test_the_instances_events_are_increases_per_second_summed_over_instances():
    text = """# HELP paycore_gc_collections_total x
# TYPE paycore_gc_collections_total counter
paycore_gc_collections_total{generation="0"} 10
paycore_gc_collections_total{generation="1"} 2
paycore_route_changes_total{to="fallback"} 1
paycore_journal_batches_total 400
paycore_queue_depth 7
"""
    first = parse_exposition(text)
    assert first['paycore_gc_collections_total{generation="1"}'] == 2 and first["paycore_queue_depth"] == 7
    later = {**first, 'paycore_gc_collections_total{generation="0"}': 30,
             'paycore_route_changes_total{to="fallback"}': 2, "paycore_journal_batches_total": 1400,
             "paycore_queue_depth": 0}
    events = ServiceEvents([Scrape(1_000, first), Scrape(3_000, later)])
    series = events.series(origin_ms=0)
    assert series["gc generation 0"] == [(3.0, 10.0)]
    assert series["gc generation 1"] == [(3.0, 0.0)]
    assert series["journal syncs"] == [(3.0, 500.0)]
    assert series["to fallback"] == [(3.0, 0.5)]
    assert series["queue depth"] == [(3.0, 0.0)]
    assert events.totals()["journal syncs"] == 1000
