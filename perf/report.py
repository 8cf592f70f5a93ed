"""Figures from a benchmark run: latency percentiles, the challenge's score and
result shape (SPEC §5), and the chart."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

FEES = {"default": 0.07, "fallback": 0.10}


class Request(NamedTuple):
    """A row written by the load generator (perf/loadgen.c)."""

    start_us: int
    latency_us: int       # from the request's write to the response's arrival (kernel timestamp)
    status: int           # 0: failed (no answer in time, or a broken connection)
    read_latency_us: int  # from the request's write to when the generator read the response
    new_connection: bool  # the request went out on a connection opened for it

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300


def read_requests(path: Path) -> list[Request]:
    with path.open() as file:
        return [Request(int(row["start_us"]), int(row["latency_us"]), int(row["status"]),
                        int(row["read_latency_us"]), row["new_connection"] == "1")
                for row in csv.DictReader(file)]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (as k6's trend percentiles)."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def latency_summary_ms(latencies_us: list[int]) -> dict[str, float]:
    values = sorted(latencies_us)
    return {name: round(percentile(values, fraction) / 1000, 4)
            for name, fraction in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999),
                                   ("max", 1.0))}


def success_latencies_ms(requests: list[Request]) -> tuple[dict[str, float], dict[str, float]]:
    """Percentiles of the successful requests: to the response's arrival, and
    to the generator's read of it (which adds the generator's own wake-up)."""
    succeeded = [request for request in requests if request.succeeded]
    return (latency_summary_ms([request.latency_us for request in succeeded]),
            latency_summary_ms([request.read_latency_us for request in succeeded]))


def latencies_by_connection_ms(requests: list[Request]) -> dict[str, dict[str, float]]:
    """Percentiles (to arrival) of the successful requests that opened their
    connection and of those that reused one: a connection's first request also
    pays for its hand-over to an instance."""
    succeeded = [request for request in requests if request.succeeded]
    return {name: latency_summary_ms([request.latency_us for request in succeeded
                                      if request.new_connection == new])
            for name, new in (("new_connection", True), ("reused_connection", False))}


def score(p99_ms: float, processed: dict[str, dict], inconsistencies: int,
          successful_posts: int) -> dict:
    """The challenge's result, from the processors' own admin summaries."""
    p99 = round(p99_ms, 2)
    bonus = max(round((11 - p99) * 0.02, 2), 0)
    fine = 0.35 if inconsistencies > 0 else 0
    gross = sum(report["totalAmount"] for report in processed.values())
    fees = sum(processed[name]["totalAmount"] * FEES[name] for name in processed)
    net = (gross - fees) * (1 + bonus - fine)
    recorded = sum(report["totalRequests"] for report in processed.values())
    result = {
        "total_liquido": round(net, 2),
        "total_bruto": round(gross, 2),
        "total_taxas": round(fees, 2),
        "descricao": "'total_liquido' is the score: (gross - fees) * (1 + p99.bonus - multa.porcentagem)",
        "p99": {"valor": f"{p99}ms", "bonus": bonus, "max_requests": "603",
                "descricao": "bonus = max((11 - p99) * 0.02, 0)"},
        "multa": {"porcentagem": fine, "total": round((gross - fees) * fine, 2),
                  "composicao": {"total_inconsistencias": inconsistencies,
                                 "descricao": "any inconsistency costs 35 %"}},
        "lag": {"num_pagamentos_total": recorded, "num_pagamentos_solicitados": successful_posts,
                "lag": successful_posts - recorded,
                "descricao": "successful POSTs the processors had not recorded at teardown"},
    }
    for name in ("default", "fallback"):
        result[f"pagamentos_realizados_{name}"] = {
            "total_bruto": processed[name]["totalAmount"],
            "num_pagamentos": processed[name]["totalRequests"],
            "total_taxas": round(processed[name]["totalAmount"] * FEES[name], 2),
        }
    return result


def draw_chart(path: Path, requests: list[Request], bucket_s: float,
               shares: list[tuple[float, int, int]], stage_seconds: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets: dict[int, list[int]] = {}
    for request in requests:
        if request.succeeded:
            buckets.setdefault(int(request.start_us / 1e6 // bucket_s), []).append(request.latency_us)
    times = sorted(buckets)
    figure, (latency_axis, share_axis) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for name, fraction in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        latency_axis.plot([t * bucket_s for t in times],
                          [percentile(sorted(buckets[t]), fraction) / 1000 for t in times], label=name)
    latency_axis.axhline(0.5, color="red", linestyle=":", label="target p99 0.5 ms")
    latency_axis.set_ylabel("POST /payments latency (ms)")
    latency_axis.set_yscale("log")
    latency_axis.legend(loc="upper left")
    latency_axis.set_title(f"latency per {bucket_s:g} s of load")
    share_axis.stackplot([t for t, _, _ in shares], [d for _, d, _ in shares], [f for _, _, f in shares],
                         labels=["default", "fallback"], step="post")
    share_axis.set_ylabel("payments recorded (by requestedAt)")
    share_axis.set_xlabel("seconds since the load began")
    share_axis.legend(loc="upper left")
    for second in stage_seconds:
        for axis in (latency_axis, share_axis):
            axis.axvline(second, color="grey", linewidth=0.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
