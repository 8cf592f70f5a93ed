"""The load balancer: one TCP port in front of the instances.

It accepts each client connection and hands it, round robin, to an instance
over that instance's hand-off socket (pyx/connection_handoff.pyx, received by
service.handoff), then closes its own copy: from then on client and instance
talk directly and the balancer relays no byte, so a request crosses no extra
hop and the balancer works once per connection, not per request. While every
instance takes connections, accepting and handing over run in C without the
GIL. An instance that cannot take one (stopped, restarting) is skipped and
tried again, at most every RECONNECT_INTERVAL_S, on a later connection; one
that is alive but whose queue of handed-over connections is full is skipped
for that connection. A connection no instance can take is closed, so its
client retries elsewhere instead of waiting: at once when none is up, after
up to FULL_WAIT_S for room when those up are all full.

    PAYCORE_BALANCER_LISTEN     host:port to accept clients on (0.0.0.0:9999); port 0: any free
                                one, announced to the parent (paycore.ready)
    PAYCORE_BALANCER_INSTANCES  comma-separated hand-off socket paths, one per instance
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time

from paycore.core.connection_handoff import hand_off_connections, send_connection
from paycore.ready import announce

from . import logs

log = logging.getLogger("paycore.balancer")

RECONNECT_INTERVAL_S = 0.1
FULL_WAIT_S = 1.0
BACKLOG = 4096


class InstanceChannel:
    """The hand-off socket of one instance: connected on first use and again after a failure."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.channel: socket.socket | None = None
        self._retry_at = 0.0
        self._up: bool | None = None

    def connect(self) -> bool:
        if self.channel is not None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.setblocking(False)
        try:
            channel.connect(self.path)
        except OSError as error:
            channel.close()
            self._retry_at = now + RECONNECT_INTERVAL_S
            self._mark(False, error)
            return False
        self.channel = channel
        self._mark(True)
        return True

    def take(self, connection_fd: int) -> bool:
        """Hand the connection over; False if this instance cannot take it now."""
        # A channel found broken is connected again at once: the instance may have restarted.
        for _ in range(2):
            if not self.connect():
                return False
            try:
                send_connection(self.channel.fileno(), connection_fd)
                return True
            except BlockingIOError:
                return False
            except OSError as error:
                self.disconnect(error)
        return False

    def disconnect(self, error: OSError) -> None:
        self.close()
        self._mark(False, error)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _mark(self, up: bool, error: OSError | None = None) -> None:
        if up != self._up:
            self._up = up
            if up:
                log.info("instance at %s is taking connections", self.path)
            else:
                log.warning("instance at %s cannot take connections: %s", self.path, error)


class Balancer:
    def __init__(self, listen: tuple[str, int], instance_paths: list[str]) -> None:
        if not instance_paths:
            raise ValueError("the balancer needs at least one instance")
        self.instances = [InstanceChannel(path) for path in instance_paths]
        self._next = 0
        self.refused = 0
        self._stopping = False
        self._listener = socket.create_server(listen, backlog=BACKLOG)

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def serve_forever(self) -> None:
        """Until stop(), from another thread, or a signal's handler raises."""
        while not self._stopping:
            if all(instance.connect() for instance in self.instances):
                self._serve_in_c()
            else:
                self._serve_one()

    def _serve_in_c(self) -> None:
        """Until a connection or the listener needs a decision made here."""
        channels = [instance.channel.fileno() for instance in self.instances]
        self._next, connection_fd, failed, error = hand_off_connections(
            self._listener.fileno(), channels, self._next)
        if connection_fd < 0:
            self._accept_failed(error)
            return
        if failed >= 0:
            self.instances[failed].disconnect(OSError(error, os.strerror(error)))
        try:
            self.hand_off(connection_fd)
        finally:
            os.close(connection_fd)

    def _serve_one(self) -> None:
        """One connection, with instances down: each is tried again when its time has come."""
        try:
            connection, _ = self._listener.accept()
        except OSError as error:
            self._accept_failed(error.errno)
            return
        with connection:
            self.hand_off(connection.fileno())

    def _accept_failed(self, error: int) -> None:
        if self._stopping or error in (errno.EINTR, errno.ECONNABORTED):
            return  # a signal's handler has run; or a client gave up before its accept
        # Out of descriptors or memory: say so, and take the next one when it comes.
        log.error("accepting a connection failed: %s", os.strerror(error))
        time.sleep(RECONNECT_INTERVAL_S)

    def hand_off(self, connection_fd: int) -> bool:
        """Give the connection to the next instance that takes it; False if none did in time."""
        deadline = time.monotonic() + FULL_WAIT_S
        count = len(self.instances)
        while True:
            for _ in range(count):
                instance = self.instances[self._next]
                self._next = (self._next + 1) % count
                if instance.take(connection_fd):
                    return True
            full = [instance.channel for instance in self.instances if instance.channel is not None]
            remaining = deadline - time.monotonic()
            if not full or remaining <= 0:
                self.refused += 1
                return False
            # Every instance is up and behind: wait for room at one of them.
            select.select([], full, [], remaining)

    def stop(self) -> None:
        """Make serve_forever return: shutting the listener down wakes its accept."""
        if not self._stopping:
            self._stopping = True
            self._listener.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for instance in self.instances:
            instance.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    logs.configure(os.environ.get("PAYCORE_LOG_LEVEL", "INFO"))
    listen = _address(os.environ.get("PAYCORE_BALANCER_LISTEN", "0.0.0.0:9999"))
    paths = [path.strip() for path in os.environ.get("PAYCORE_BALANCER_INSTANCES", "").split(",")
             if path.strip()]
    if not paths:
        raise SystemExit("PAYCORE_BALANCER_INSTANCES must name at least one hand-off socket")
    signal.signal(signal.SIGTERM, _stop)
    balancer = Balancer(listen, paths)
    log.info("balancing %s:%d over %s", *balancer.address, ", ".join(paths))
    announce(["%s:%d" % balancer.address])
    try:
        balancer.serve_forever()
    finally:
        balancer.close()


if __name__ == "__main__":
    main()
