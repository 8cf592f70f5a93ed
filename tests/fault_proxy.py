"""A fault-injecting HTTP proxy between the service instances and one emulated
payment processor. The test switches it between faults while payments flow;
the emulator behind it keeps recording the truth the test checks against.

It runs its own event loop in a thread of the test process and understands
just enough HTTP/1.1 (Content-Length framing, as the processors and the
service's client use) to tell requests apart and to forward, hold, cut or
replace answers. Every forwarded request goes over a fresh upstream connection.
"""
from __future__ import annotations

import asyncio
import enum
import re
import socket
import struct
import threading
from typing import Self

PAYMENT = (b"POST", b"/payments")
HEALTH = (b"GET", b"/payments/service-health")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
TOO_MANY_REQUESTS = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n"
# Not JSON, not text: what a broken serializer or an unrelated server might send.
GARBAGE = b'<html>\x00\xff\xfe{"message": "payment proc'
GARBAGE_OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(GARBAGE), GARBAGE)
# Long enough for the service to read the first half of an answer before the reset.
RESET_AFTER_S = 0.05


class Fault(enum.Enum):
    NONE = "pass everything through"
    HANG = "read each request, never answer"
    HANG_AFTER_FORWARDING = "forward each request, never answer: the processor did record it"
    HANG_ON_CONNECT = "connections never complete (a full accept queue drops the handshakes)"
    REFUSE = "nothing listens: connections are refused, open ones closed"
    RESET_MID_RESPONSE = "forward each request, send half the answer, then reset the connection"
    THROTTLE_PAYMENTS = "429 to every POST /payments, without forwarding it"
    HEALTH_THROTTLED = "429 to every health check"
    HEALTH_SLOW = "every health check answered health_delay_s late"
    GARBAGE_AFTER_FORWARDING = "the processor's 200s to POST /payments arrive with a garbage body"
    GARBAGE_WITHOUT_FORWARDING = "200 with a garbage body to every POST /payments, nothing forwarded"

    def touches(self, method: bytes, path: bytes) -> bool:
        if self in (Fault.HEALTH_THROTTLED, Fault.HEALTH_SLOW):
            return (method, path) == HEALTH
        if self in (Fault.THROTTLE_PAYMENTS, Fault.GARBAGE_AFTER_FORWARDING,
                    Fault.GARBAGE_WITHOUT_FORWARDING):
            return (method, path) == PAYMENT
        return self is not Fault.NONE


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One whole request or response, head and body; None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as end:
        if end.partial:
            raise
        return None
    length = CONTENT_LENGTH.search(head)
    return head + await reader.readexactly(int(length.group(1)) if length else 0)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (SO_LINGER 0), as a crashed peer or middlebox does."""
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _reusable_socket(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:port beside the others bound there:
    SO_REUSEADDR lets sockets share a port as long as one at most listens."""
    bound = socket.socket()
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bound.bind(("127.0.0.1", port))
    return bound


class FaultProxy:
    """Listens on a port of 127.0.0.1 (`url`) and forwards to `upstream_url`, unless
    `set_fault` says otherwise. `touched` counts the requests a fault changed,
    `forwarded_payments` the payments passed on untouched."""

    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.health_delay_s = 1.0
        self.fault = Fault.NONE
        self.touched = 0
        self.forwarded_payments = 0
        self._server: asyncio.Server | None = None
        self._blackhole: list[socket.socket] = []
        self._clients: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        # Bound and never listening, it holds the port for the proxy's whole life:
        # while the proxy refuses connections nobody else can take the port.
        self._port_holder = _reusable_socket(0)
        self.port = self._port_holder.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._call(self._listen())

    def set_fault(self, fault: Fault) -> None:
        self._call(self._switch(fault))

    def close(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._port_holder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=_reusable_socket(self.port))

    async def _switch(self, fault: Fault) -> None:
        # Before listening again: connections accepted from then on meet the new fault.
        self.fault = fault
        stops_listening = fault in (Fault.REFUSE, Fault.HANG_ON_CONNECT)
        if stops_listening and self._server is not None:
            self._server.close()
            self._server = None
            for writer in list(self._clients):
                writer.transport.abort()
        for held in self._blackhole:
            held.close()
        self._blackhole.clear()
        if fault is Fault.HANG_ON_CONNECT:
            self._blackhole = self._full_accept_queue()
        elif not stops_listening and self._server is None:
            await self._listen()

    def _full_accept_queue(self) -> list[socket.socket]:
        """A listener with room for one pending connection, taken by our own: Linux then
        drops every SYN, and a client's connect waits for its own timeout. The filler
        connects without blocking this loop: an instance reconnecting at that moment
        may take the room first, and then the filler's own SYN is dropped too."""
        listener = _reusable_socket(self.port)
        listener.listen(0)
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", self.port))
        return [listener, filler]

    async def _shutdown(self) -> None:
        await self._switch(Fault.REFUSE)
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while (request := await read_message(reader)) is not None:
                if not await self._answer(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the service gave up on this connection, we reset it, or the proxy closes
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _answer(self, request: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request as the current fault says; False once the connection is done."""
        fault = self.fault
        method, path = request.split(b" ", 2)[:2]
        if not fault.touches(method, path):
            if (method, path) == PAYMENT:
                self.forwarded_payments += 1
            writer.write(await self._forward(request))
            await writer.drain()
            return True
        self.touched += 1
        match fault:
            case Fault.HANG:
                await reader.read()  # until the service gives up and closes
                return False
            case Fault.HANG_AFTER_FORWARDING:
                await self._forward(request)
                await reader.read()
                return False
            case Fault.REFUSE | Fault.HANG_ON_CONNECT:
                return False  # came on a connection opened before the fault
            case Fault.RESET_MID_RESPONSE:
                response = await self._forward(request)
                writer.write(response[:len(response) // 2])
                await writer.drain()
                await asyncio.sleep(RESET_AFTER_S)
                reset(writer)
                return False
            case Fault.THROTTLE_PAYMENTS | Fault.HEALTH_THROTTLED:
                writer.write(TOO_MANY_REQUESTS)
            case Fault.HEALTH_SLOW:
                response = await self._forward(request)
                await asyncio.sleep(self.health_delay_s)
                writer.write(response)
            case Fault.GARBAGE_AFTER_FORWARDING:
                response = await self._forward(request)
                writer.write(GARBAGE_OK if response.startswith(b"HTTP/1.1 200") else response)
            case Fault.GARBAGE_WITHOUT_FORWARDING:
                writer.write(GARBAGE_OK)
        await writer.drain()
        return True

    async def _forward(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            writer.write(request)
            response = await read_message(reader)
        finally:
            writer.close()
        if response is None:
            raise ConnectionResetError("the processor closed the connection without answering")
        return response
