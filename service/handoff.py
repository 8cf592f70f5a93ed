"""An instance's end of the connection hand-off (pyx/connection_handoff.pyx):
it listens on a unix socket for the load balancer (service.balancer), takes
the client connections it hands over and serves each one with the same
protocol as any other listener; from then on client and instance talk directly."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from paycore.core.connection_handoff import receive_connections

log = logging.getLogger("paycore.handoff")


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
        self._channels: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        claim_socket_path(path)
        self._listener.bind(path)
        os.chmod(path, 0o666)  # the balancer may run as another user
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._accept_channel)

    def _accept_channel(self) -> None:
        try:
            channel, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        channel.setblocking(False)
        self._channels.add(channel)
        self._loop.add_reader(channel.fileno(), self._take_connections, channel)

    def _take_connections(self, channel: socket.socket) -> None:
        try:
            fds, closed = receive_connections(channel.fileno())
        except OSError as error:
            log.warning("hand-off channel failed: %r", error)
            fds, closed = [], True
        for fd in fds:
            self._serve(fd)
        if closed:
            self._drop_channel(channel)

    def _serve(self, fd: int) -> None:
        try:
            connection = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        if connection.type != socket.SOCK_STREAM:
            connection.close()
            return
        # Started here rather than in a task: its transport then exists at once
        # and reads the client's request in this loop turn's poll, a turn earlier.
        _start(self._loop.connect_accepted_socket(self._protocol_factory, connection), connection)

    def _drop_channel(self, channel: socket.socket) -> None:
        self._loop.remove_reader(channel.fileno())
        self._channels.discard(channel)
        channel.close()

    def close(self) -> None:
        """Take no more connections (the balancer then hands them to another
        instance); those already handed over, queued ones included, are served on."""
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for channel in list(self._channels):
            self._take_connections(channel)
            if channel in self._channels:
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
        log.warning("could not serve a handed-over connection: %r", error)
        connection.close()
        return
    if isinstance(awaited, asyncio.Future):
        awaited._asyncio_future_blocking = False
        awaited.add_done_callback(lambda _: _start(handshake, connection))
    else:  # a bare yield: another turn of the loop
        asyncio.get_running_loop().call_soon(_start, handshake, connection)
