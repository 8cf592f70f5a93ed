"""What an instance counts, in Prometheus text format (0.0.4), served on its own
listener (PAYCORE_METRICS_LISTEN), never on the public one.

A request costs two clock reads and a few increments of plain numbers in
lists: no locks, no labels, no text. Those are produced when Prometheus
scrapes, and gauges (queue depth, requests in flight, journal backlog,
connections) are read then from the objects that own them.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

from . import responses
from .processor_client import Outcome
from .router import PROCESSOR_NAMES, ROUTE_NAMES

if TYPE_CHECKING:
    from paycore.core.ring_queue import RingQueue

    from .connections import ConnectionGuard
    from .delivery import Dispatcher
    from .store.embedded.journal import JournalWriter
    from .router import Router

# The route label of an answered request. UNROUTED: refused by the HTTP layer
# before any route saw it (malformed, too large, too slow, too many connections).
ROUTES = ("/payments", "/payments-summary", "/purge-payments", "/metrics", "other", "unrouted")
PAYMENTS, SUMMARY, PURGE, METRICS, OTHER, UNROUTED = range(len(ROUTES))
HIGHEST_STATUS = 599
# Every answer starts "HTTP/1.1 NNN": the status digits are at 9, 10 and 11.
STATUS_DIGITS_OFFSET = ord("0") * 111

RETRY_KINDS = ("requeued", "pinned_resend", "resumed_unsent", "resumed_unresolved")
REQUEUED, PINNED_RESEND, RESUMED_UNSENT, RESUMED_UNRESOLVED = range(len(RETRY_KINDS))

# Sub-millisecond answers are the norm (README, Performance): most buckets are there.
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

EXPOSITION_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class LatencyHistogram:
    """Seconds as floats from time.perf_counter(): in CPython cheaper to subtract
    and compare than nanosecond ints, which outgrow a machine word."""

    __slots__ = ("bounds_s", "bucket_counts", "sum_s")

    def __init__(self, bounds_s: tuple[float, ...]) -> None:
        self.bounds_s = bounds_s
        # Per bucket, not cumulative; the last one is +Inf.
        self.bucket_counts = [0] * (len(bounds_s) + 1)
        self.sum_s = 0.0

    def observe_since(self, started_at: float) -> None:
        elapsed_s = perf_counter() - started_at
        self.bucket_counts[bisect_left(self.bounds_s, elapsed_s)] += 1
        self.sum_s += elapsed_s


class Metrics:
    """One instance's counters, bumped by the components given it."""

    def __init__(self) -> None:
        # [route][status]
        self.responses = [[0] * (HIGHEST_STATUS + 1) for _ in ROUTES]
        self.latency = LatencyHistogram(LATENCY_BUCKETS_S)
        # [processor][outcome]
        self.outcomes = tuple(dict.fromkeys(Outcome, 0) for _ in PROCESSOR_NAMES)
        self.routing_decisions = [0] * len(ROUTE_NAMES)
        self.route_changes = [0] * len(ROUTE_NAMES)  # by the new route
        self.retries = [0] * len(RETRY_KINDS)

    def responded(self, route: int, response: bytes) -> None:
        self.responses[route][
            response[9] * 100 + response[10] * 10 + response[11] - STATUS_DIGITS_OFFSET] += 1

    def render(self, gauges: GaugeSources) -> bytes:
        text: list[str] = []
        _family(text, "paycore_http_requests_total", "counter",
                "Requests answered, by route and status, on every listener; route 'other': a path "
                "nobody serves; 'unrouted': refused by the HTTP layer (malformed, too large, too "
                "slow, too many connections).",
                ((f'route="{route}",status="{status}"', count)
                 for route, counts in zip(ROUTES, self.responses)
                 for status, count in enumerate(counts) if count))
        self._render_latency(text)
        _family(text, "paycore_processor_outcomes_total", "counter",
                "Payment requests sent to a processor, by how they ended: ok (200), 422 (already "
                "held), 5xx, 429, 4xx, unreachable (never sent), timeout (unknown outcome).",
                ((f'processor="{processor}",outcome="{outcome.value}"', count)
                 for processor, outcomes in zip(PROCESSOR_NAMES, self.outcomes)
                 for outcome, count in outcomes.items()))
        _family(text, "paycore_routing_decisions_total", "counter",
                "Where the dispatcher was told to send the next payment; none: both "
                "processors unusable, payments wait.",
                ((f'target="{target}"', count) for target, count in zip(ROUTE_NAMES, self.routing_decisions)))
        _family(text, "paycore_route_changes_total", "counter",
                "Changes of route, by the route changed to.",
                ((f'to="{target}"', count) for target, count in zip(ROUTE_NAMES, self.route_changes)))
        _family(text, "paycore_payment_retries_total", "counter",
                "Payments tried again: requeued after an attempt that stored nothing (or a pinned "
                "payment its processor does not hold), resends of pinned payments (unknown "
                "outcome), and payments resumed from the journal at start.",
                ((f'kind="{kind}"', count) for kind, count in zip(RETRY_KINDS, self.retries)))
        gauges.render(text)
        return "".join(text).encode()

    def _render_latency(self, text: list[str]) -> None:
        name = "paycore_http_request_duration_seconds"
        histogram = self.latency
        text.append(f"# HELP {name} From a request's first byte read to its answer written, which "
                    "waits for the journal to hold what the answer promises; routed requests only.\n"
                    f"# TYPE {name} histogram\n")
        cumulative = 0
        for bound, count in zip((*histogram.bounds_s, "+Inf"), histogram.bucket_counts):
            cumulative += count
            text.append(f'{name}_bucket{{le="{bound}"}} {cumulative}\n')
        text.append(f"{name}_sum {histogram.sum_s}\n{name}_count {cumulative}\n")


@dataclass(frozen=True)
class GaugeSources:
    """The objects whose state is read at each scrape."""

    queue: RingQueue
    dispatcher: Dispatcher
    router: Router
    journal: JournalWriter | None  # the embedded store's; a Redis store keeps none
    connections: ConnectionGuard

    def render(self, text: list[str]) -> None:
        _family(text, "paycore_queue_depth", "gauge", "Payments waiting in the queue.",
                (("", len(self.queue)),))
        _family(text, "paycore_payments_in_flight", "gauge",
                "Payments taken from the queue whose attempt has not ended (at most PAYCORE_MAX_IN_FLIGHT).",
                (("", self.dispatcher.in_flight),))
        _family(text, "paycore_processor_requests_in_flight", "gauge",
                "Payment requests sent to a processor and not answered yet, resends of pinned payments included.",
                ((f'processor="{state.name}"', state.in_flight) for state in self.router.processors))
        _family(text, "paycore_payments_unresolved", "gauge",
                "Payments worked on outside the queue: pinned after an unknown outcome, "
                "being looked up after a restart, or waiting for room in the queue.",
                (("", self.dispatcher.unresolved),))
        if self.journal is not None:
            _family(text, "paycore_journal_backlog_records", "gauge",
                    "Journal records appended and not yet written.", (("", self.journal.backlog),))
            _family(text, "paycore_journal_batches_total", "counter",
                    "Journal writes (group commits).", (("", self.journal.batches),))
            _family(text, "paycore_journal_records_total", "counter",
                    "Journal records written.", (("", self.journal.records),))
        _family(text, "paycore_open_connections", "gauge",
                "Client connections open, on every listener of this instance.",
                (("", self.connections.open_connections),))
        _family(text, "paycore_refused_connections_total", "counter",
                "Connections refused for being over PAYCORE_MAX_CONNECTIONS.",
                (("", self.connections.refused),))


def _family(text: list[str], name: str, kind: str, help_text: str,
            samples: Iterable[tuple[str, int]]) -> None:
    text.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
    for labels, value in samples:
        text.append(f"{name}{{{labels}}} {value}\n" if labels else f"{name} {value}\n")


class MetricsEndpoint:
    """The metrics listener's handler: GET /metrics, and nothing else."""

    def __init__(self, metrics: Metrics, gauges: GaugeSources) -> None:
        self._metrics = metrics
        self._gauges = gauges

    def handle(self, method: bytes, url: bytes, body: bytes, authorization: bytes) -> bytes:
        if method == b"GET" and url.partition(b"?")[0] == b"/metrics":
            route = METRICS
            response = responses.http_response(
                200, self._metrics.render(self._gauges), content_type=EXPOSITION_CONTENT_TYPE)
        else:
            route = OTHER
            response = responses.NOT_FOUND
        self._metrics.responded(route, response)
        return response
