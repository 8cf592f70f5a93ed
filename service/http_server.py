"""HTTP/1.1 server protocol: one instance per connection, httptools callbacks
that only collect, and a handler that answers at once or with a future (a
store that answers later); an answer is written as soon as the store holds
what it promised, and pipelined requests keep their order."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol

import httptools

from . import responses
from .connections import ConnectionGuard
from .metrics import UNROUTED, LatencyHistogram, Metrics
from .store.base import Deferred

NOT_IN_A_REQUEST = -1


class RequestHandler(Protocol):
    """Answers one request (routes.Routes on the public listeners, metrics.MetricsEndpoint)."""

    def handle(self, method: bytes, url: bytes, body: bytes) -> Deferred[bytes]: ...


class Durability(Protocol):
    """When answers may leave (the store, or its journal)."""

    def after_durable(self, callback: Callable[..., Any], *args: Any) -> None: ...

    def flush_waiting(self) -> None: ...


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_guard",
        "_head_size",
        "_durability",
        "_idle_sweeps",
        "_latency",
        "_limits",
        "_metrics",
        "_parser",
        "_request_sweeps",
        "_routes",
        "_started_at",
        "_transport",
        "_unanswered",
        "_url",
    )

    def __init__(self, routes: RequestHandler, durability: Durability, guard: ConnectionGuard,
                 metrics: Metrics) -> None:
        self._routes = routes
        self._durability = durability
        self._guard = guard
        self._limits = guard.limits
        self._metrics = metrics
        self._latency = self._metrics.latency
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._started_at = 0.0
        # Answers that must wait for an earlier one still being worked out:
        # (answer or its future, transport, hang up, start time or None if not timed)
        self._unanswered: deque[tuple[Deferred[bytes], asyncio.Transport, bool, float | None]] = deque()
        # Counted by the guard's timer; reset by the request path, which keeps no clock
        # for timeouts (only the start, for the latency histogram).
        self._request_sweeps = NOT_IN_A_REQUEST
        self._idle_sweeps = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if not self._guard.admit(self):
            self._reject(responses.TOO_MANY_CONNECTIONS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._guard.release(self)

    def sweep(self, request_timeout_sweeps: int, idle_timeout_sweeps: int) -> None:
        if self._request_sweeps != NOT_IN_A_REQUEST:
            self._request_sweeps += 1
            if self._request_sweeps > request_timeout_sweeps:
                self._reject(responses.REQUEST_TIMEOUT)
        else:
            self._idle_sweeps += 1
            if self._idle_sweeps > idle_timeout_sweeps and self._transport is not None:
                self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._idle_sweeps = 0
        try:
            self._parser.feed_data(data)
            self._durability.flush_waiting()
        except httptools.HttpParserUpgrade:
            # No protocol switch here. A request that asked for one was answered
            # already when it completed: just hang up after that answer.
            if self._request_sweeps != NOT_IN_A_REQUEST:
                self._reject(responses.BAD_REQUEST)
            elif self._transport is not None:
                transport, self._transport = self._transport, None
                self._durability.after_durable(transport.close)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._reject(responses.BAD_REQUEST)

    def on_message_begin(self) -> None:
        self._started_at = perf_counter()
        self._url = b""
        self._body.clear()
        self._body_size = 0
        self._head_size = 0
        self._request_sweeps = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._limits.max_head_bytes:
            self._reject(responses.HEAD_TOO_LARGE)
            raise httptools.HttpParserError("request head too large")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes:
            self._reject(responses.BODY_TOO_LARGE)
            raise httptools.HttpParserError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._request_sweeps = NOT_IN_A_REQUEST
        transport = self._transport
        if transport is None:
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        response = self._routes.handle(self._parser.get_method(), self._url, body)
        hang_up = not self._parser.should_keep_alive()
        if isinstance(response, bytes) and not self._unanswered:
            # The request path: an answer known at once, nothing before it.
            self._release(response, transport, hang_up, self._started_at)
        else:
            self._answer_in_order(response, transport, hang_up, self._started_at)

    def _reject(self, response: bytes) -> None:
        """Answer and hang up: after a broken request the stream cannot be trusted."""
        transport, self._transport = self._transport, None
        if transport is not None:
            self._metrics.responded(UNROUTED, response)
            self._answer_in_order(response, transport, True, None)

    def _answer_in_order(self, response: Deferred[bytes], transport: asyncio.Transport, hang_up: bool,
                         started_at: float | None) -> None:
        self._unanswered.append((response, transport, hang_up, started_at))
        if not isinstance(response, bytes):
            response.add_done_callback(self._answer_ready)
        self._answer_ready()

    def _answer_ready(self, _: asyncio.Future | None = None) -> None:
        """Answer the requests at the head of the line whose answers are known."""
        unanswered = self._unanswered
        while unanswered:
            response, transport, hang_up, started_at = unanswered[0]
            if not isinstance(response, bytes):
                if not response.done():
                    return
                response = response.result()
            unanswered.popleft()
            self._release(response, transport, hang_up, started_at)

    def _release(self, response: bytes, transport: asyncio.Transport, hang_up: bool,
                 started_at: float | None) -> None:
        """Write the answer once the store holds what it promised; timed from
        started_at, unless None (refused before any route saw it)."""
        if started_at is None:
            self._durability.after_durable(_answer, transport, response, hang_up)
        else:
            self._durability.after_durable(_answer_timed, transport, response, hang_up,
                                           self._latency, started_at)


def _answer(transport: asyncio.Transport, response: bytes, hang_up: bool) -> None:
    if transport.is_closing():
        return
    transport.write(response)
    if hang_up:
        transport.close()


def _answer_timed(transport: asyncio.Transport, response: bytes, hang_up: bool,
                  latency: LatencyHistogram, started_at: float) -> None:
    _answer(transport, response, hang_up)
    latency.observe_since(started_at)
