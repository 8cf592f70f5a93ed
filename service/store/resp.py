"""A small asyncio Redis client (RESP2) for the Redis store.

Commands are pipelined: each is appended to a buffer, and the buffer leaves
with one write at `flush()`, which whoever issues a batch calls at its end (a
callback scheduled at the first buffered command is the safety net). Replies
are parsed by hiredis's C reader and matched to the commands in order. A lost
connection fails every command written to it with RedisUnavailable; the next
command connects again, and a connect that is refused or does not complete
within the timeout fails the commands waiting for it; so does a server that
answers nothing for the reply timeout while commands wait (hung, paused, or
cut off without a reset), whose connection is then dropped. Scripts run by EVALSHA
and fall back to EVAL (which also loads them) when the server lacks them.

Addresses: redis://HOST:PORT/DB and redis+unix:///PATH?db=N.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import hiredis

Arg = bytes | int | str
# Applied to a reply before it becomes the future's result.
Convert = Callable[[Any], Any] | None
# (future, convert, the script an EVALSHA runs or None, the command's arguments)
_Pending = tuple[asyncio.Future, Convert, "Script | None", tuple[Arg, ...]]

CONNECT_TIMEOUT_S = 1.0
REPLY_TIMEOUT_S = 2.0
DEFAULT_PORT = 6379


class RedisError(Exception):
    """The server answered the command with an error."""


class RedisUnavailable(ConnectionError):
    """No answer from the server: a command written before the connection was
    lost may or may not have run."""


@dataclass(frozen=True)
class RedisAddress:
    host: str = ""
    port: int = DEFAULT_PORT
    unix_path: str = ""  # set instead of host and port for a unix socket
    db: int = 0

    def __str__(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"


def parse_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError(f"credentials in a Redis URL are not supported: {url!r}")
    if parts.scheme == "redis":
        db = parts.path.lstrip("/")
        return RedisAddress(host=parts.hostname or "127.0.0.1", port=parts.port or DEFAULT_PORT,
                            db=int(db or 0))
    if parts.scheme == "redis+unix" and parts.path:
        return RedisAddress(unix_path=parts.path, db=int(parse_qs(parts.query).get("db", ["0"])[-1]))
    raise ValueError(f"expected redis://HOST:PORT/DB or redis+unix:///PATH?db=N, got {url!r}")


class Script:
    """A Lua script, run by its SHA1 once the server holds it."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


class _Connection(asyncio.Protocol):
    """One connection: replies come back in the order the commands were written."""

    def __init__(self, client: RedisClient, reply_timeout_s: float) -> None:
        self._client = client
        self._reader = hiredis.Reader()
        self._waiting: deque[_Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self._reply_timeout_s = reply_timeout_s
        # Since when the oldest command waits for its reply (or the last reply came).
        self._waiting_since = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def send(self, data: bytes | bytearray, pending: list[_Pending]) -> None:
        assert self.transport is not None
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting.extend(pending)
        self.transport.write(data)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._reply_timeout_s, self._watch)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._waiting_since = time.monotonic()
        try:
            reply = self._reader.gets()
            while reply is not False:
                self._client.deliver(self._waiting.popleft(), reply)
                reply = self._reader.gets()
        except hiredis.ProtocolError:
            # The stream can no longer be matched to commands: give up on it.
            assert self.transport is not None
            self.transport.abort()

    def _watch(self) -> None:
        """Drop a connection on which commands wait and nothing has come back
        for the reply timeout: its replies can no longer be told apart."""
        self._watchdog = None
        if not self._waiting or self.transport is None:
            return
        overdue_in_s = self._waiting_since + self._reply_timeout_s - time.monotonic()
        if overdue_in_s <= 0:
            self.transport.abort()
        else:
            self._watchdog = asyncio.get_running_loop().call_later(overdue_in_s, self._watch)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, deque()
        for future, *_ in waiting:
            if not future.done():
                future.set_exception(RedisUnavailable(f"connection to redis lost: {exc or 'closed'}"))
        self._client.connection_lost(self)


class RedisClient:
    def __init__(self, url: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.address = parse_url(url)
        self._connect_timeout_s = connect_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._buffer = bytearray()
        self._buffered: list[_Pending] = []
        self._scheduled_flush: asyncio.Handle | None = None
        self._closed = False

    def execute(self, *args: Arg, convert: Convert = None) -> asyncio.Future:
        """A future of the reply (convert(reply) when given); it fails with
        RedisError for an error reply, RedisUnavailable without a connection."""
        return self._enqueue(args, convert, None, None)

    def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg],
            convert: Convert = None) -> asyncio.Future:
        """EVALSHA, or EVAL when the server does not know the script (yet)."""
        return self._enqueue((b"EVALSHA", script.sha, len(keys), *keys, *args), convert, script, None)

    def flush(self) -> None:
        """Write every buffered command now, with one write (after connecting
        first when there is no connection)."""
        if self._scheduled_flush is not None:
            self._scheduled_flush.cancel()
            self._scheduled_flush = None
        if not self._buffered:
            return
        if self._connection is not None and self._connection.closing:
            # Lost, and not yet told: what is buffered was never written, so it
            # goes out on a new connection.
            self._connection = None
        if self._connection is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            return
        # The old buffer is handed over whole, never changed again: no copy.
        data, self._buffer = self._buffer, bytearray()
        pending, self._buffered = self._buffered, []
        self._connection.send(data, pending)

    def close(self) -> None:
        """Fail what is still buffered and close the connection; what was
        written to it fails once it is closed."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None and not self._connection.closing:
            self._connection.transport.close()
        self._fail_buffered("redis client closed")

    def deliver(self, pending: _Pending, reply: Any) -> None:
        future, convert, script, args = pending
        if future.done():  # the caller gave up on it
            return
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if script is not None and message.startswith("NOSCRIPT"):
                self._enqueue((b"EVAL", script.source, *args[2:]), convert, None, future)
            else:
                future.set_exception(RedisError(message))
            return
        if convert is None:
            future.set_result(reply)
            return
        try:
            future.set_result(convert(reply))
        except Exception as error:  # noqa: BLE001 - a reply of an unexpected shape fails its own command only
            future.set_exception(error)

    def connection_lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    def _enqueue(self, args: tuple[Arg, ...], convert: Convert, script: Script | None,
                 future: asyncio.Future | None) -> asyncio.Future:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if future is None:
            future = self._loop.create_future()
        if self._closed:
            future.set_exception(RedisUnavailable("redis client closed"))
            return future
        self._buffer += hiredis.pack_command(args)
        self._buffered.append((future, convert, script, args))
        if self._scheduled_flush is None:
            self._scheduled_flush = self._loop.call_soon(self.flush)
        return future

    async def _connect(self) -> None:
        try:
            connection = await asyncio.wait_for(self._open(), self._connect_timeout_s)
        except (OSError, RedisError) as error:  # TimeoutError is an OSError
            self._fail_buffered(f"cannot connect to redis at {self.address}: {error!r}")
            return
        finally:
            self._connecting = None
        self._connection = connection
        self.flush()

    async def _open(self) -> _Connection:
        assert self._loop is not None
        if self.address.unix_path:
            _, connection = await self._loop.create_unix_connection(
                lambda: _Connection(self, self._reply_timeout_s), self.address.unix_path)
        else:
            _, connection = await self._loop.create_connection(
                lambda: _Connection(self, self._reply_timeout_s), self.address.host, self.address.port)
        try:
            if self.address.db:
                selected = self._loop.create_future()
                connection.send(hiredis.pack_command((b"SELECT", self.address.db)),
                                [(selected, None, None, ())])
                await selected
        except BaseException:
            connection.transport.close()
            raise
        return connection

    def _fail_buffered(self, message: str) -> None:
        pending, self._buffered = self._buffered, []
        self._buffer = bytearray()
        for future, *_ in pending:
            if not future.done():
                future.set_exception(RedisUnavailable(message))
