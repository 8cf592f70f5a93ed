"""An instance's end of the hand-off (pyx/socket_handoff.pyx): it listens on a
unix socket for the load balancer (service.balancer), which hands it its own
listening socket on the public port (and another instance's while that one
is away); the instance accepts client connections from them itself and
serves each one with the same protocol as any other listener. So a new
connection wakes one process, the instance that serves it, not the balancer
and then an instance."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from paycore.core.socket_handoff import accept_connection, receive_sockets

log = logging.getLogger("paycore.handoff")

ACCEPTS_PER_TURN = 64


def claim_socket_path(path: str) -> None:
    """Make room to bind a unix socket at path: its directory, and no socket
    left there by an earlier run of this instance."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)


class HandoffListener:
    def __init__(self, path: str, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self._protocol_factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        # Each channel (a balancer's connection) with the listening sockets it
        # handed over: they are given up when it hangs up.
        self._channels: dict[socket.socket, list[socket.socket]] = {}
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        claim_socket_path(path)
        self._listener.bind(path)
        os.chmod(path, 0o666)  # the balancer may run as another user
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._accept_channel)

    @property
    def listening_sockets(self) -> int:
        """How many listening sockets it accepts from: 0 until a balancer hands one over."""
        return sum(len(handed) for handed in self._channels.values())

    def _accept_channel(self) -> None:
        try:
            channel, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        channel.setblocking(False)
        self._channels[channel] = []
        self._loop.add_reader(channel.fileno(), self._take_sockets, channel)

    def _take_sockets(self, channel: socket.socket) -> None:
        try:
            fds, closed = receive_sockets(channel.fileno())
        except OSError as error:
            log.warning("hand-off channel failed: %r", error)
            fds, closed = [], True
        for fd in fds:
            self._listen_on(channel, fd)
        if closed:
            self._drop_channel(channel)

    def _listen_on(self, channel: socket.socket, fd: int) -> None:
        try:
            public = socket.socket(fileno=fd)
            listening = public.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as error:
            log.warning("a handed-over descriptor is not a socket: %r", error)
            os.close(fd)
            return
        if not listening or public.type != socket.SOCK_STREAM:
            log.warning("a handed-over socket is not a listening stream socket: %r", public)
            public.close()
            return
        public.setblocking(False)
        self._channels[channel].append(public)
        self._loop.add_reader(public.fileno(), self._accept, public)

    def _accept(self, public: socket.socket) -> None:
        """What waits in the queue, up to ACCEPTS_PER_TURN: a loop turn can be
        long under load, and taking one connection per turn lets the queue
        outgrow the clients' patience; taking every one lets a burst hold up
        the requests of those already served."""
        for _ in range(ACCEPTS_PER_TURN):
            try:
                fd = accept_connection(public.fileno())
            except OSError as error:
                # Out of descriptors or memory: the connection waits in the queue,
                # and is tried again next turn.
                log.error("accepting a connection failed: %r", error)
                return
            if fd < 0:
                return
            self._serve(fd)

    def _serve(self, fd: int) -> None:
        connection = socket.socket(fileno=fd)
        # Started here rather than in a task: its transport then exists at once
        # and reads the client's request in this loop turn's poll, a turn earlier.
        _start(self._loop.connect_accepted_socket(self._protocol_factory, connection), connection)

    def _drop_channel(self, channel: socket.socket) -> None:
        """Its balancer is gone: what it handed over is given up with it (a
        balancer started again hands over its own listening socket)."""
        for public in self._channels.pop(channel):
            self._loop.remove_reader(public.fileno())
            public.close()
        self._loop.remove_reader(channel.fileno())
        channel.close()

    def close(self) -> None:
        """Take no more connections: the balancer hands this instance's
        listening socket, and what waits in its queue, to another instance, or
        closes them if none is left. Those already accepted are served on."""
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for channel in list(self._channels):
            self._drop_channel(channel)


def _start(handshake: Coroutine[Any, Any, Any], connection: socket.socket) -> None:
    """Step the handshake as a task would: now, then each time what it awaits
    is done. If it fails, the connection is closed: its client sees the end
    at once instead of waiting for an answer."""
    try:
        awaited = handshake.send(None)
    except StopIteration:
        return
    except Exception as error:  # noqa: BLE001 - one connection's failure, logged
        # Logged before the close: whoever sees the connection end finds the reason written.
        log.warning("could not serve a connection: %r", error)
        connection.close()
        return
    if isinstance(awaited, asyncio.Future):
        awaited._asyncio_future_blocking = False
        awaited.add_done_callback(lambda _: _start(handshake, connection))
    else:  # a bare yield: another turn of the loop
        asyncio.get_running_loop().call_soon(_start, handshake, connection)
