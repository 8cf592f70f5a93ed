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
"""
from __future__ import annotations

import time
from collections import OrderedDict
from itertools import count

from .processor_client import Outcome, ProcessorHealth

DEFAULT = 0
FALLBACK = 1
PROCESSOR_NAMES = ("default", "fallback")


def _now_ms() -> float:
    return time.monotonic() * 1000


class ProcessorState:
    """What this instance believes about one processor right now."""

    __slots__ = ("name", "failing", "latency_ms", "signal_at_ms", "_in_flight")

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

    def expected_latency_ms(self) -> float:
        if self._in_flight:
            oldest = next(iter(self._in_flight.values()))
            return max(self.latency_ms, _now_ms() - oldest)
        return self.latency_ms


class Router:
    def __init__(self, default_max_latency_ms: int) -> None:
        self.processors = (ProcessorState(PROCESSOR_NAMES[DEFAULT]),
                           ProcessorState(PROCESSOR_NAMES[FALLBACK]))
        self._default_max_latency_ms = default_max_latency_ms
        self._tickets = count()

    def choose(self) -> int | None:
        default, fallback = self.processors
        if not default.failing:
            default_latency = default.expected_latency_ms()
            if default_latency <= self._default_max_latency_ms:
                return DEFAULT
            if not fallback.failing and fallback.expected_latency_ms() < default_latency:
                return FALLBACK
            return DEFAULT
        if not fallback.failing:
            return FALLBACK
        return None

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
