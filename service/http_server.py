"""HTTP/1.1 server protocol: one instance per connection, httptools callbacks
that only collect, and a synchronous handler whose answer is written as soon
as the journal holds what it promised (pipelined requests keep their order)."""
from __future__ import annotations

import asyncio

import httptools

from . import responses
from .journal import JournalWriter
from .routes import Routes


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_journal",
        "_max_body",
        "_parser",
        "_routes",
        "_transport",
        "_url",
    )

    def __init__(self, routes: Routes, journal: JournalWriter, max_body: int) -> None:
        self._routes = routes
        self._journal = journal
        self._max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(responses.BAD_REQUEST)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._reject(responses.BAD_REQUEST)

    def on_message_begin(self) -> None:
        self._url = b""
        self._body.clear()
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._reject(responses.BODY_TOO_LARGE)
            raise httptools.HttpParserError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        response = self._routes.handle(self._parser.get_method(), self._url, body)
        self._journal.after_durable(_answer, transport, response, not self._parser.should_keep_alive())

    def _reject(self, response: bytes) -> None:
        """Answer and hang up: after a broken request the stream cannot be trusted."""
        transport, self._transport = self._transport, None
        if transport is not None:
            self._journal.after_durable(_answer, transport, response, True)


def _answer(transport: asyncio.Transport, response: bytes, hang_up: bool) -> None:
    if transport.is_closing():
        return
    transport.write(response)
    if hang_up:
        transport.close()
