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


LATENCY_WINDOW_S = 10.0


def window_percentiles(requests: list[Request], fraction: float,
                       window_s: float = LATENCY_WINDOW_S) -> list[tuple[float, float]]:
    """(window start in seconds since the load began, the successful requests'
    latency percentile in it, ms), for every window holding a request."""
    windows: dict[int, list[int]] = {}
    for request in requests:
        if request.succeeded:
            windows.setdefault(int(request.start_us / 1e6 // window_s), []).append(request.latency_us)
    return [(index * window_s, percentile(sorted(windows[index]), fraction) / 1000) for index in sorted(windows)]


def draw_chart(path: Path, requests: list[Request], bucket_s: float,
               shares: list[tuple[float, int, int]], stage_seconds: list[float], *,
               floor: list[Request] | None = None,
               events: dict[str, list[tuple[float, float]]] | None = None,
               check_seconds: list[float] = ()) -> None:
    """Latency per LATENCY_WINDOW_S with the floor's p99 beside it and the events
    marked (stage changes: grey; route changes: coloured by target; the
    checker's summaries: ticks), what the instances did per second (events
    from service_events.py), and where payments were recorded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if events else 2
    figure, axes = plt.subplots(panels, 1, figsize=(11, 3.4 * panels), sharex=True)
    latency_axis, share_axis = axes[0], axes[-1]
    for name, fraction in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        points = window_percentiles(requests, fraction)
        latency_axis.plot([t for t, _ in points], [v for _, v in points], label=name, marker=".")
    if floor:
        points = window_percentiles(floor, 0.99)
        latency_axis.plot([t for t, _ in points], [v for _, v in points], color="black", linestyle="--",
                          label="floor p99 (constant server, same run)")
    latency_axis.set_ylabel("POST /payments latency (ms)")
    latency_axis.set_yscale("log")
    latency_axis.set_title(f"latency per {LATENCY_WINDOW_S:g} s of load")
    for second in check_seconds:
        latency_axis.axvline(second, ymax=0.04, color="purple", linewidth=1.5)
    route_colours = {"to default": "tab:green", "to fallback": "tab:red", "to none": "black"}
    for name, colour in route_colours.items():
        changes = [t for t, rate in (events or {}).get(name, []) if rate > 0]
        for index, second in enumerate(changes):
            latency_axis.axvline(second, color=colour, linestyle=":", linewidth=1,
                                 label=f"route {name}" if index == 0 else None)
    if check_seconds:
        latency_axis.plot([], [], color="purple", linewidth=1.5, label="checker's summaries")
    latency_axis.legend(loc="upper left", fontsize="small", ncol=2)
    if events:
        event_axis = axes[1]
        for name in ("journal syncs", "gc generation 0", "gc generation 1", "gc generation 2", "unknown outcomes"):
            points = events.get(name, [])
            if any(rate for _, rate in points):
                event_axis.plot([t for t, _ in points], [rate for _, rate in points], label=f"{name} /s",
                                linewidth=1)
        event_axis.set_yscale("symlog")
        event_axis.set_ylabel("per second, both instances")
        depth_axis = event_axis.twinx()
        depth = events.get("queue depth", [])
        depth_axis.fill_between([t for t, _ in depth], [v for _, v in depth], step="post", alpha=0.2,
                                color="grey", label="queue depth (backlog)")
        depth_axis.set_ylabel("payments queued")
        event_axis.legend(loc="upper left", fontsize="small", ncol=3)
        depth_axis.legend(loc="upper right", fontsize="small")
    share_axis.stackplot([t for t, _, _ in shares], [d for _, d, _ in shares], [f for _, _, f in shares],
                         labels=["default", "fallback"], step="post")
    share_axis.set_ylabel("payments recorded (by requestedAt)")
    share_axis.set_xlabel("seconds since the load began")
    share_axis.legend(loc="upper left")
    for second in stage_seconds:
        for axis in axes:
            axis.axvline(second, color="grey", linewidth=0.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
