"""Which processor gets the next payment.

Each processor's state merges two kinds of signal, the newest winning: the
shared health board (one poller for all instances) and what this instance's
own requests observe. The rule (README, "Routing"):

1. the default, while it is not failing and its expected latency is at most
   default_max_latency_ms;
2. else the fallback, if it is not failing and faster than the default (or the
   default is failing);
3. else the default if it is not failing, however slow;
4. else none: payments wait in the queue, and one probe at a time tests
   whether a processor came back.

Expected latency is the larger of the last latency seen (by a request or the
health check) and the age of the oldest request still waiting for an answer:
a processor that turns slow is noticed before its first slow answer arrives.
The default also counts as too slow, for the moment, once its oldest request
has waited far longer than its usual latency: a sudden 2 s delay is then
noticed after ~0.2 s instead of 1.5 s, which keeps few payments landing at the
edge of the checker's window; if the answers show it is still fast enough,
the default is back at the next choice.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from itertools import count
from typing import TYPE_CHECKING

from .processor_client import Outcome, ProcessorHealth

if TYPE_CHECKING:
    from .metrics import Metrics

DEFAULT = 0
FALLBACK = 1
PROCESSOR_NAMES = ("default", "fallback")
# Route None (both unusable: payments wait) where routes index a list.
NOBODY = 2
ROUTE_NAMES = (*PROCESSOR_NAMES, "none")
log = logging.getLogger("paycore.router")
# An unanswered request older than max(3 x usual latency, usual + 200 ms) means
# the processor has slowed down (well beyond jitter on a fast processor).
SLOWDOWN_FACTOR = 3
SLOWDOWN_MARGIN_MS = 200


def _now_ms() -> float:
    return time.monotonic() * 1000


def _route_index(route: int | None) -> int:
    return NOBODY if route is None else route


class ProcessorState:
    """What this instance believes about one processor right now."""

    __slots__ = ("_in_flight", "failing", "latency_ms", "name", "signal_at_ms")

    def __init__(self, name: str) -> None:
        self.name = name
        self.failing = False
        self.latency_ms = 0.0
        self.signal_at_ms = 0.0
        self._in_flight: OrderedDict[int, float] = OrderedDict()

    def request_started(self, ticket: int) -> None:
        self._in_flight[ticket] = _now_ms()

    def request_ended(self, ticket: int, outcome: Outcome) -> None:
        now = _now_ms()
        started = self._in_flight.pop(ticket, now)
        self.signal_at_ms = now
        if outcome.recorded:
            self.failing = False
            self.latency_ms = now - started
        elif outcome is Outcome.UNKNOWN:
            self.latency_ms = now - started
        else:
            self.failing = True

    def apply_health(self, health: ProcessorHealth, polled_at_ms: float) -> None:
        """A health report counts only if it is newer than what requests observed."""
        if polled_at_ms > self.signal_at_ms:
            self.signal_at_ms = polled_at_ms
            self.failing = health.failing
            self.latency_ms = float(health.min_response_time_ms)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _oldest_request_age_ms(self) -> float:
        if self._in_flight:
            return _now_ms() - next(iter(self._in_flight.values()))
        return 0.0

    def expected_latency_ms(self) -> float:
        return max(self.latency_ms, self._oldest_request_age_ms())

    def fast_enough(self, limit_ms: float) -> bool:
        usual = self.latency_ms
        patience = min(limit_ms, max(usual * SLOWDOWN_FACTOR, usual + SLOWDOWN_MARGIN_MS))
        return usual <= limit_ms and self._oldest_request_age_ms() <= patience


class Router:
    def __init__(self, default_max_latency_ms: int, metrics: Metrics) -> None:
        self.processors = (ProcessorState(PROCESSOR_NAMES[DEFAULT]),
                           ProcessorState(PROCESSOR_NAMES[FALLBACK]))
        self._default_max_latency_ms = default_max_latency_ms
        self._tickets = count()
        self._last_route: int | None = DEFAULT
        self._decisions = metrics.counter_family(
            "paycore_routing_decisions_total",
            "Where the dispatcher was told to send the next payment; none: both processors "
            "unusable, payments wait.", {"target": ROUTE_NAMES})
        self._changes = metrics.counter_family(  # by the new route
            "paycore_route_changes_total", "Changes of route, by the route changed to.", {"to": ROUTE_NAMES})
        metrics.register_gauges(
            "paycore_processor_requests_in_flight", "gauge",
            "Payment requests sent to a processor and not answered yet, resends of pinned payments included.",
            "processor", lambda: ((state.name, state.in_flight) for state in self.processors))

    def choose(self) -> int | None:
        route, reason = self._decide()
        index = _route_index(route)
        self._decisions[index] += 1
        if route != self._last_route:
            # Once per change, never per payment: the text is only built here.
            log.info("routing %s -> %s: %s", ROUTE_NAMES[_route_index(self._last_route)],
                     ROUTE_NAMES[index], reason.format(self.processors[DEFAULT].expected_latency_ms()))
            self._changes[index] += 1
            self._last_route = route
        return route

    def _decide(self) -> tuple[int | None, str]:
        """The route and the reason, as a template of the default's expected latency."""
        default, fallback = self.processors
        if not default.failing:
            if default.fast_enough(self._default_max_latency_ms):
                return DEFAULT, "default healthy and fast enough"
            if not fallback.failing and fallback.expected_latency_ms() < default.expected_latency_ms():
                return FALLBACK, "default slow (expected {:.0f} ms), fallback faster"
            return DEFAULT, "default slow (expected {:.0f} ms), fallback no better"
        if not fallback.failing:
            return FALLBACK, "default failing"
        return None, "both failing: payments wait"

    def probe_target(self) -> int:
        """With both failing: the one whose failure was seen longest ago."""
        default, fallback = self.processors
        return DEFAULT if default.signal_at_ms <= fallback.signal_at_ms else FALLBACK

    def usable(self, processor: int) -> bool:
        return not self.processors[processor].failing

    def start(self, processor: int) -> int:
        ticket = next(self._tickets)
        self.processors[processor].request_started(ticket)
        return ticket

    def end(self, processor: int, ticket: int, outcome: Outcome) -> None:
        self.processors[processor].request_ended(ticket, outcome)
