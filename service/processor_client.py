"""HTTP/1.1 keep-alive client for one payment processor.

A small pool of asyncio protocols with httptools response parsing: one request
per connection at a time, a timer per request instead of a wrapper task.
Every call ends in an Outcome that tells the caller what the processor may
now hold; nothing here decides where a payment goes next.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
import orjson

from paycore.core.correlation_id import uuid_to_text
from paycore.core.processor_payload import encode_payment
from paycore.core.timestamp import parse_timestamp


class Outcome(enum.Enum):
    PROCESSED = "ok"            # 200: the processor recorded it now
    ALREADY_HELD = "422"        # 422: the processor already holds this correlationId
    FAILED = "5xx"              # 5xx: the processor stored nothing
    THROTTLED = "429"           # 429: not admitted, stored nothing
    REJECTED = "4xx"            # other 4xx: stored nothing
    NOT_SENT = "unreachable"    # no connection: the request never left
    UNKNOWN = "timeout"         # sent, no answer: it may or may not be stored

    @property
    def recorded(self) -> bool:
        return self is Outcome.PROCESSED or self is Outcome.ALREADY_HELD

    @property
    def stored_nothing(self) -> bool:
        return not self.recorded and self is not Outcome.UNKNOWN


@dataclass(frozen=True)
class HeldPayment:
    """A payment as a processor reports holding it (GET /payments/{id}): its
    requestedAt is what the processor's summaries filter on."""

    requested_at_ms: int


@dataclass(frozen=True)
class ProcessorHealth:
    failing: bool
    min_response_time_ms: int


class ProcessorError(Exception):
    """A call whose answer tells nothing (no connection, timeout, unexpected status)."""


class _ResponseLost(ProcessorError):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the pool hands it to one request at a time."""

    __slots__ = ("_pool", "_transport", "_parser", "_body", "_waiter", "_timer", "closed")

    def __init__(self, pool: ProcessorClient) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        self._finish(exception=_ResponseLost("connection closed before the response"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(exception=_ResponseLost("malformed response"))
            self.close()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        body = b"".join(self._body)
        self._body.clear()
        keep_alive = self._parser.should_keep_alive()
        self._finish(result=(status, body))
        if keep_alive and not self.closed:
            self._pool._release(self)
        else:
            self.close()

    def request(self, data: bytes, timeout_s: float) -> asyncio.Future:
        loop = self._pool.loop
        self._waiter = loop.create_future()
        self._timer = loop.call_later(timeout_s, self._expire)
        self._transport.write(data)  # type: ignore[union-attr]
        return self._waiter

    def _expire(self) -> None:
        self._timer = None
        # The answer may still come, so this connection can never be reused.
        self._finish(exception=asyncio.TimeoutError())
        self.close()

    def _finish(self, result=None, exception: BaseException | None = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if exception is not None:
                waiter.set_exception(exception)
            else:
                waiter.set_result(result)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class ProcessorClient:
    """Calls to one processor: send a payment, look one up, read its health."""

    def __init__(self, name: str, base_url: str, timeout_ms: int,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"processor URL must be http://host[:port], got {base_url!r}")
        self.name = name
        self.base_url = base_url
        self.loop = loop or asyncio.get_event_loop()
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout_s = timeout_ms / 1000
        authority = f"{self._host}:{self._port}".encode()
        self._payment_head = (b"POST /payments HTTP/1.1\r\nHost: " + authority
                              + b"\r\nContent-Type: application/json\r\nContent-Length: ")
        self._get_head = b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def send_payment(self, uuid16: bytes, cents: int, requested_at_ms: int) -> Outcome:
        body = encode_payment(uuid16, cents, requested_at_ms)
        request = self._payment_head + str(len(body)).encode() + b"\r\n\r\n" + body
        try:
            connection = await self._acquire()
        except OSError:
            return Outcome.NOT_SENT
        try:
            status, _ = await connection.request(request, self._timeout_s)
        except (asyncio.TimeoutError, _ResponseLost):
            return Outcome.UNKNOWN
        if status == 200:
            return Outcome.PROCESSED
        if status == 422:
            return Outcome.ALREADY_HELD
        if status == 429:
            return Outcome.THROTTLED
        if status >= 500:
            return Outcome.FAILED
        return Outcome.REJECTED

    async def find_payment(self, uuid16: bytes) -> HeldPayment | None:
        """What the processor holds for this correlationId, or None; ProcessorError if it cannot tell."""
        status, body = await self._get(b"/payments/" + uuid_to_text(uuid16).encode())
        if status == 404:
            return None
        if status != 200:
            raise ProcessorError(f"{self.name}: GET /payments/{{id}} answered {status}")
        try:
            held = orjson.loads(body)
            return HeldPayment(requested_at_ms=parse_timestamp(held["requestedAt"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ProcessorError(f"{self.name}: unreadable payment record: {error}") from None

    async def health(self) -> ProcessorHealth:
        status, body = await self._get(b"/payments/service-health")
        if status != 200:
            raise ProcessorError(f"{self.name}: health check answered {status}")
        try:
            report = orjson.loads(body)
            return ProcessorHealth(bool(report["failing"]), int(report["minResponseTime"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ProcessorError(f"{self.name}: unreadable health report: {error}") from None

    async def _get(self, path: bytes) -> tuple[int, bytes]:
        try:
            connection = await self._acquire()
            return await connection.request(b"GET " + path + self._get_head, self._timeout_s)
        except (OSError, asyncio.TimeoutError, _ResponseLost) as error:
            raise ProcessorError(f"{self.name}: {type(error).__name__}: {error}") from None

    async def _acquire(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        # An unreachable host drops the handshake and the kernel would retry it for
        # minutes; TimeoutError is an OSError: nothing was sent.
        async with asyncio.timeout(self._timeout_s):
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self), self._host, self._port)
        self._open.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        self._idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()
