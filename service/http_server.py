"""HTTP/1.1 server protocol: one instance per connection, httptools callbacks
that only collect, and a handler that answers at once or with a future (a
store that answers later); an answer is written as soon as the store holds
what it promised, and pipelined requests keep their order.

Connection management follows RFC 9112 §9 and RFC 9110 §10.1.1: an answer
after which the connection ends says `Connection: close` (a request that asked
for it, HTTP/1.0 without keep-alive, a refused request, a protocol switch);
an HTTP/1.0 client that asked for keep-alive is told it is kept; a request
that expects 100-continue gets the interim answer, or its final one at once
when its announced body is already too large. Reading pauses and resumes by
flow_control.FlowControl."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol

import httptools

from . import responses
from .responses import CLOSE, KEEP_ALIVE
from .connections import ConnectionGuard
from .flow_control import FEED_BYTES, INPUT_HELD, MAX_OWED_ANSWERS, FlowControl
from .metrics import Metrics
from .store.base import Deferred

NOT_IN_A_REQUEST = -1
# The route of an answer the HTTP layer gave before any handler saw the request.
UNROUTED = "unrouted"
UNROUTED_MEANING = "refused by the HTTP layer (malformed, too large, too slow, too many connections)"
# The lengths of the header names looked at: expect, connection, authorization,
# content-length. Any other header costs one length lookup.
NOTED_NAME_LENGTHS = frozenset((6, 10, 13, 14))
# The most one read takes from a connection's socket. The transport would read
# up to 256 KiB at once, and a pipelining client's whole read is held while
# flow control keeps it from being parsed: 200 such clients held 50 MB. What a
# client sends beyond a read stays in the kernel's socket buffer meanwhile.
READ_BYTES = 16384
# One buffer for every connection of the process: a read is copied out of it
# before the next read, in the same callback.
_read_buffer = memoryview(bytearray(READ_BYTES))


class RequestHandler(Protocol):
    """Answers one request (routes.Routes on the public listeners, metrics.MetricsEndpoint).
    authorization: the request's Authorization header, b"" if none."""

    def handle(self, method: bytes, url: bytes, body: bytes, authorization: bytes) -> Deferred[bytes]: ...


class Durability(Protocol):
    """When answers may leave (the store, or its journal): a connection's
    answers wait for what its own requests made the store promise, nothing else."""

    promised: int

    def after_durable(self, promise: int, callback: Callable[..., Any], *args: Any) -> None: ...

    def flush_waiting(self) -> None: ...


class HttpProtocol(asyncio.BufferedProtocol):
    __slots__ = (
        "_asked_connection",
        "_authorization",
        "_body",
        "_body_size",
        "_declared_length",
        "_durability",
        "_ending",
        "_expectation",
        "_flow",
        "_guard",
        "_head_size",
        "_held_turn",
        "_idle_sweeps",
        "_latency",
        "_limits",
        "_metrics",
        "_owed",
        "_parser",
        "_promised",
        "_request_sweeps",
        "_routes",
        "_started_at",
        "_transport",
        "_unanswered",
        "_unrouted",
        "_unread",
        "_url",
    )

    def __init__(self, routes: RequestHandler, durability: Durability, guard: ConnectionGuard,
                 metrics: Metrics) -> None:
        self._routes = routes
        self._durability = durability
        self._promised = 0  # what this connection's answers wait for the store to hold
        self._guard = guard
        self._limits = guard.limits
        self._metrics = metrics
        self._latency = metrics.latency
        self._unrouted = metrics.route(UNROUTED, UNROUTED_MEANING)
        self._parser = httptools.HttpRequestParser(self)
        # None once no more requests are served on the connection (it ends after
        # the answers owed); the transport itself stays with the flow control.
        self._transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._started_at = 0.0
        # The request's headers that decide how it is answered, and its ending:
        # None (the connection stays), CLOSE or KEEP_ALIVE.
        self._asked_connection = False
        self._authorization = b""
        self._expectation = b""
        self._declared_length = b""
        self._ending: bytes | None = None
        # Answers that must wait for an earlier one still being worked out:
        # (answer or its future, transport, connection ending, start time or None if not timed)
        self._unanswered: deque[tuple[Deferred[bytes], asyncio.Transport, bytes | None, float | None]] = deque()
        # Requests read (and interim answers due) whose answers are not written yet.
        self._owed = 0
        # Input not parsed yet: it waits for the connection's next turn of the loop.
        self._unread = b""
        self._held_turn: asyncio.Handle | None = None
        # Counted by the guard's timer; reset by the request path, which keeps no clock
        # for timeouts (only the start, for the latency histogram).
        self._request_sweeps = NOT_IN_A_REQUEST
        self._idle_sweeps = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._flow = FlowControl(self._transport, self._take_turn)
        if not self._guard.admit(self):
            self._reject(responses.TOO_MANY_CONNECTIONS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._unread = b""
        if self._held_turn is not None:
            self._held_turn.cancel()
            self._held_turn = None
        self._guard.release(self)

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    def sweep(self, request_timeout_sweeps: int, idle_timeout_sweeps: int) -> None:
        if self._flow.stalled(request_timeout_sweeps):
            return
        if self._request_sweeps != NOT_IN_A_REQUEST:
            self._request_sweeps += 1
            if self._request_sweeps > request_timeout_sweeps:
                self._reject(responses.REQUEST_TIMEOUT)
        else:
            self._idle_sweeps += 1
            if self._idle_sweeps > idle_timeout_sweeps and self._transport is not None:
                self._transport.close()

    # --- reading --------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self._idle_sweeps = 0
        if self._unread or len(data) > FEED_BYTES:
            self._hold(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch here. A request that asked for one was answered
            # when it completed, and the connection ends after that answer.
            if self._request_sweeps != NOT_IN_A_REQUEST:
                self._reject(responses.BAD_REQUEST)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._reject(responses.BAD_REQUEST)
        self._durability.flush_waiting()
        if self._owed >= MAX_OWED_ANSWERS:
            self._flow.answers_owed(self._owed)

    def _hold(self, data: bytes) -> None:
        """Keep input to parse a slice at a time, one slice per turn of the loop."""
        if self._transport is None:
            return  # the connection ends: nothing more is read
        self._unread += data
        if not self._flow.paused & INPUT_HELD:
            self._flow.hold_input()

    def _take_turn(self) -> None:
        """Flow control: held input may be parsed on (at the next turn of the loop)."""
        if self._held_turn is None:
            self._held_turn = asyncio.get_running_loop().call_soon(self._parse_held)

    def _parse_held(self) -> None:
        self._held_turn = None
        if self._transport is None:
            self._unread = b""
            return
        if self._flow.paused != INPUT_HELD:
            return  # paused for another reason too: resumed by flow control
        data, rest = self._unread[:FEED_BYTES], self._unread[FEED_BYTES:]
        self._unread = b""
        self.data_received(data)  # one slice, nothing held before it: parsed now
        self._unread = rest
        if not self._unread:
            self._flow.input_taken()
        elif self._flow.paused == INPUT_HELD:
            self._take_turn()

    # --- httptools callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self._started_at = perf_counter()
        self._url = b""
        self._body.clear()
        self._body_size = 0
        self._head_size = 0
        self._authorization = b""
        self._declared_length = b""
        self._request_sweeps = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self._limits.max_head_bytes:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        name_size = len(name)
        self._head_size += name_size + len(value)
        if self._head_size > self._limits.max_head_bytes:
            self._head_too_large()
        if name_size in NOTED_NAME_LENGTHS:
            if name == b"Content-Length":  # as most clients spell it: no lower() per request
                self._declared_length = value
            else:
                self._note_header(name.lower(), value)

    def _note_header(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            self._declared_length = value
        elif name == b"connection":
            self._asked_connection = True
        elif name == b"authorization":
            self._authorization = value
        elif name == b"expect":
            self._expectation = value

    def _head_too_large(self) -> None:
        self._reject(responses.HEAD_TOO_LARGE)
        raise httptools.HttpParserError("request head too large")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._ending = CLOSE if parser.should_upgrade() or not parser.should_keep_alive() else None
        if self._asked_connection or self._expectation:
            self._read_options()

    def _read_options(self) -> None:
        """The rare headers that change how a request is answered; reset for the next."""
        if self._asked_connection:
            self._asked_connection = False
            if self._ending is None and self._parser.get_http_version() == "1.0":
                self._ending = KEEP_ALIVE
        if self._expectation:
            self._meet_expectation()
            self._expectation = b""

    def _meet_expectation(self) -> None:
        """RFC 9110 §10.1.1: 100 (Continue) at once, or the final answer at once
        if the head alone decides it; an expectation in HTTP/1.0 is ignored."""
        transport = self._transport
        if (transport is None or self._expectation.strip().lower() != b"100-continue"
                or self._parser.get_http_version() != "1.1"):
            return
        declared = self._declared_length.strip()
        if declared.isdigit() and int(declared) > self._limits.max_body_bytes:
            self._reject(responses.BODY_TOO_LARGE)
            raise httptools.HttpParserError("announced body too large")
        self._answer_in_order(responses.CONTINUE, transport, None, None)

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
        promised = self._durability.promised
        response = self._routes.handle(self._parser.get_method(), self._url, body, self._authorization)
        if self._durability.promised != promised:
            self._promised = self._durability.promised
        ending = self._ending
        if ending is None and isinstance(response, bytes) and not self._unanswered:
            # The request path: an answer known at once, nothing before it.
            self._owed += 1
            self._release(response, transport, None, self._started_at)
            return
        if ending is CLOSE:
            self._transport = None  # RFC 9112 §9.6: no later request is served
        self._answer_in_order(response, transport, ending, self._started_at)

    # --- answering ---------------------------------------------------------------

    def _reject(self, response: bytes) -> None:
        """Answer and hang up: after a broken request the stream cannot be trusted."""
        transport, self._transport = self._transport, None
        if transport is not None:
            self._metrics.responded(self._unrouted, response)
            self._answer_in_order(response, transport, CLOSE, None)

    def _answer_in_order(self, response: Deferred[bytes], transport: asyncio.Transport,
                         ending: bytes | None, started_at: float | None) -> None:
        self._owed += 1
        self._unanswered.append((response, transport, ending, started_at))
        if not isinstance(response, bytes):
            response.add_done_callback(self._answer_ready)
        self._answer_ready()

    def _answer_ready(self, _: asyncio.Future | None = None) -> None:
        """Answer the requests at the head of the line whose answers are known."""
        unanswered = self._unanswered
        while unanswered:
            response, transport, ending, started_at = unanswered[0]
            if not isinstance(response, bytes):
                if not response.done():
                    return
                response = response.result()
            unanswered.popleft()
            self._release(response, transport, ending, started_at)

    def _release(self, response: bytes, transport: asyncio.Transport, ending: bytes | None,
                 started_at: float | None) -> None:
        """Write the answer once the store holds what it promised; timed from
        started_at, unless None (refused before any route saw it)."""
        if ending is not None:
            response = responses.with_connection(response, ending)
        self._durability.after_durable(self._promised, self._write, transport, response, ending is CLOSE,
                                       started_at)

    def _write(self, transport: asyncio.Transport, response: bytes, hang_up: bool,
               started_at: float | None) -> None:
        self._owed -= 1
        if not transport.is_closing():
            transport.write(response)
            if hang_up:
                transport.close()
        if started_at is not None:
            self._latency.observe_since(started_at)
        if self._flow.paused:
            self._flow.answers_owed(self._owed)
