"""HTTP/1.1 over asyncio: one protocol object per connection, keep-alive, and pipelined
requests handled one after another so that answers leave in the order requests came."""
import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NamedTuple, cast

import httptools

MAX_BODY_SIZE = 1024 * 1024

_log = logging.getLogger(__name__)


class Request(NamedTuple):
    method: bytes
    path: bytes
    query: bytes | None
    token: bytes | None
    body: bytes


class Response(NamedTuple):
    status: int
    body: bytes = b""
    # Extra header lines, each ending in CRLF.
    headers: bytes = b""


Handler = Callable[[Request], Response | Awaitable[Response]]

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
}

BAD_REQUEST = Response(400, b'{"message":"malformed request"}')
PAYLOAD_TOO_LARGE = Response(413, b'{"message":"request body exceeds 1 MiB"}')
INTERNAL_ERROR = Response(500)


def encode_response(response: Response, keep_alive: bool) -> bytes:
    status, body, headers = response
    head = b"HTTP/1.1 %d %s\r\n%s" % (status, _REASONS[status], headers)
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    elif status != 204:
        head += b"Content-Length: 0\r\n"
    if not keep_alive:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


class _PayloadTooLarge(Exception):
    pass


class HttpConnection(asyncio.Protocol):
    """Parses requests as bytes arrive and queues them; the head of the queue is handed to
    the handler only once the previous answer has been written."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        # Each entry is a parsed request (method, url, token, body) or an answer decided
        # while parsing, with whether the connection stays open after it.
        self._queue: deque[tuple[tuple[bytes, bytes, bytes | None, bytes] | Response, bool]] = deque()
        self._answer_in_progress: asyncio.Future[Response] | None = None
        self._ignore_input = False
        self._url = b""
        self._token: bytes | None = None
        self._body_parts: list[bytes] = []
        self._body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.clear()
        if self._answer_in_progress is not None:
            self._answer_in_progress.cancel()

    def data_received(self, data: bytes) -> None:
        if self._ignore_input:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            self._reject(PAYLOAD_TOO_LARGE if isinstance(error.__context__, _PayloadTooLarge) else BAD_REQUEST)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._reject(BAD_REQUEST)
        self._answer_queued()

    def _reject(self, response: Response) -> None:
        """Answer after the requests before it, then close: the rest of the stream is unusable."""
        self._ignore_input = True
        self._queue.append((response, False))

    # httptools parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._token = None
        self._body_parts = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-rinha-token":
            self._token = value

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY_SIZE:
            raise _PayloadTooLarge
        self._body_parts.append(body)

    def on_message_complete(self) -> None:
        request = (self._parser.get_method(), self._url, self._token, b"".join(self._body_parts))
        keep_alive = self._parser.should_keep_alive()
        if not keep_alive:
            self._ignore_input = True
        self._queue.append((request, keep_alive))

    # answering

    def _answer_queued(self) -> None:
        while self._queue and self._answer_in_progress is None:
            entry, keep_alive = self._queue.popleft()
            answer = entry if isinstance(entry, Response) else self._dispatch(*entry)
            if isinstance(answer, Response):
                self._write(answer, keep_alive)
                continue
            self._answer_in_progress = asyncio.ensure_future(answer)
            self._answer_in_progress.add_done_callback(partial(self._on_answer_ready, keep_alive=keep_alive))

    def _dispatch(self, method: bytes, url: bytes, token: bytes | None, body: bytes) -> Response | Awaitable[Response]:
        try:
            parsed_url = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            return BAD_REQUEST
        try:
            return self._handle(Request(method, parsed_url.path, parsed_url.query, token, body))
        except Exception:
            _log.exception("handling %s %s failed", method.decode(), url.decode("latin-1"))
            return INTERNAL_ERROR

    def _on_answer_ready(self, answer: asyncio.Future[Response], keep_alive: bool) -> None:
        self._answer_in_progress = None
        if answer.cancelled():
            return
        error = answer.exception()
        if error is not None:
            _log.error("answering a request failed", exc_info=error)
        self._write(INTERNAL_ERROR if error is not None else answer.result(), keep_alive)
        self._answer_queued()

    def _write(self, response: Response, keep_alive: bool) -> None:
        assert self._transport is not None
        if self._transport.is_closing():
            return
        self._transport.write(encode_response(response, keep_alive))
        if not keep_alive:
            self._queue.clear()
            self._transport.close()


async def start_http_server(handle: Handler, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    # A large backlog: the load opens well over a thousand connections within moments.
    return await loop.create_server(lambda: HttpConnection(handle), host, port, backlog=4096)
