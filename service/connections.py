"""Bounds on what clients may hold: how many connections, how big a request
head, how long a request may take to arrive, how long a connection may idle.

Slow or idle clients cost an asyncio server little CPU, but each holds a file
descriptor and a buffer; without bounds enough of them starve everyone else.
One timer for the whole instance looks at every connection a few times a
second, so the request path itself keeps no clock.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .metrics import Metrics

SWEEP_INTERVAL_S = 0.25


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_head_bytes: int      # request line and headers
    max_body_bytes: int
    request_timeout_ms: int  # from a request's first byte to its last
    idle_timeout_ms: int     # between requests on a keep-alive connection


class GuardedConnection(Protocol):
    def sweep(self, request_timeout_sweeps: int, idle_timeout_sweeps: int) -> None: ...


class ConnectionGuard:
    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: set[GuardedConnection] = set()
        self._request_timeout_sweeps = _sweeps(limits.request_timeout_ms)
        self._idle_timeout_sweeps = _sweeps(limits.idle_timeout_ms)
        self._timer: asyncio.TimerHandle | None = None
        self.refused = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def register_metrics(self, metrics: Metrics) -> None:
        metrics.register_gauge("paycore_open_connections", "gauge",
                               "Client connections open, on every listener of this instance.",
                               lambda: self.open_connections)
        metrics.register_gauge("paycore_refused_connections_total", "counter",
                               "Connections refused for being over PAYCORE_MAX_CONNECTIONS.",
                               lambda: self.refused)

    def admit(self, connection: GuardedConnection) -> bool:
        if len(self._open) >= self.limits.max_connections:
            self.refused += 1
            return False
        self._open.add(connection)
        return True

    def release(self, connection: GuardedConnection) -> None:
        self._open.discard(connection)

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        for connection in list(self._open):
            connection.sweep(self._request_timeout_sweeps, self._idle_timeout_sweeps)
        self.start()


def _sweeps(timeout_ms: int) -> int:
    return max(1, math.ceil(timeout_ms / 1000 / SWEEP_INTERVAL_S))
