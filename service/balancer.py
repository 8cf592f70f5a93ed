"""The load balancer: one TCP port in front of the instances.

It binds the port once per instance, with SO_REUSEPORT, and hands each
instance its own listening socket over that instance's hand-off socket
(pyx/socket_handoff.pyx, received by service.handoff). The kernel spreads
new connections evenly over the sockets by their addresses, and each
instance accepts its own: from then on client and instance talk directly.
The balancer relays no byte and, while every instance is up, touches no
connection, so a new connection wakes only the instance that serves it.

The balancer keeps every socket open, so no connection waiting in a queue is
lost when an instance goes away (stopped, crashed, restarting): it watches
each hand-off socket, and the socket of an instance that hung up goes to one
that is up, which accepts from both until the first is back (the balancer
connects again at most every RECONNECT_INTERVAL_S). While no instance is up,
the balancer accepts each connection itself and closes it at once, so its
client retries instead of waiting.

    PAYCORE_BALANCER_LISTEN     host:port to accept clients on (0.0.0.0:9999); port 0: any free
                                one, announced to the parent (paycore.ready)
    PAYCORE_BALANCER_INSTANCES  comma-separated hand-off socket paths, one per instance
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time

from paycore.core.socket_handoff import accept_connection, send_socket
from paycore.ready import announce

from . import logs

log = logging.getLogger("paycore.balancer")

RECONNECT_INTERVAL_S = 0.1
BACKLOG = 4096


class InstanceChannel:
    """The hand-off socket of one instance, and which listening sockets
    (by index) went over it: all of them are given up when it closes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.channel: socket.socket | None = None
        self.handed: set[int] = set()
        self._retry_at = 0.0
        self._up: bool | None = None

    @property
    def up(self) -> bool:
        return self.channel is not None

    def connect(self) -> bool:
        """Whether it is newly up."""
        if self.channel is not None:
            return False
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

    def hand(self, index: int, listener: socket.socket) -> bool:
        try:
            send_socket(self.channel.fileno(), listener.fileno())
        except OSError as error:
            self.went_away(error)
            return False
        self.handed.add(index)
        return True

    def take_back(self) -> None:
        """Make it give up every socket handed over, by closing the channel,
        and connect again at once to hand over what is its own."""
        self.close()
        self.connect()

    def went_away(self, error: OSError) -> None:
        self.close()
        self._retry_at = time.monotonic() + RECONNECT_INTERVAL_S
        self._mark(False, error)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.handed.clear()

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
        self.refused = 0
        self._stopping = False
        first = _bind(listen)
        # Port 0 picks a free port for the first socket; the others join it.
        self._listeners = [first] + [_bind((listen[0], first.getsockname()[1]))
                                     for _ in instance_paths[1:]]
        for listener in self._listeners:
            listener.setblocking(False)
        self._wakeup_read, self._wakeup_write = os.pipe()

    @property
    def address(self) -> tuple[str, int]:
        return self._listeners[0].getsockname()[:2]

    def serve_forever(self) -> None:
        """Until stop(), from another thread, or a signal's handler raises."""
        while not self._stopping:
            # A list, not a generator: every instance due is tried, not only the first.
            if any([instance.connect() for instance in self.instances]):
                self._assign()
            self._watch()

    def _assign(self) -> None:
        """Each listening socket to its own instance when that one is up,
        otherwise to the instance up that holds the fewest. An instance that
        holds a socket it should not gives up all of them, and gets its own
        again at once."""
        while True:
            wanted = self._wanted()
            for instance, indexes in wanted.items():
                if not instance.handed <= indexes:
                    instance.take_back()
            if all(self._hand(instance, indexes) for instance, indexes in wanted.items()):
                return
            # An instance went away meanwhile: assign again without it.

    def _wanted(self) -> dict[InstanceChannel, set[int]]:
        wanted = {instance: {index} for index, instance in enumerate(self.instances) if instance.up}
        for index, instance in enumerate(self.instances):
            if not instance.up and wanted:
                fewest = min(wanted, key=lambda candidate: len(wanted[candidate]))
                wanted[fewest].add(index)
        return wanted

    def _hand(self, instance: InstanceChannel, indexes: set[int]) -> bool:
        """Whether it now holds every socket in indexes."""
        return instance.up and all(instance.hand(index, self._listeners[index])
                                   for index in sorted(indexes - instance.handed))

    def _watch(self) -> None:
        """Until an instance hangs up, a connection comes on a socket no
        instance holds, one that is down is due to be tried again, or stop()."""
        up = {instance.channel.fileno(): instance for instance in self.instances if instance.up}
        held = set().union(*(instance.handed for instance in self.instances))
        unheld = {listener.fileno(): listener for index, listener in enumerate(self._listeners)
                  if index not in held}
        timeout = None if len(up) == len(self.instances) else RECONNECT_INTERVAL_S
        readable, _, _ = select.select([*up, *unheld, self._wakeup_read], [], [], timeout)
        hung_up = False
        for fd in readable:
            if fd in up:
                # An instance never writes to its channel: readable means it closed its end.
                up[fd].went_away(ConnectionResetError("its hand-off socket hung up"))
                hung_up = True
            elif fd in unheld:
                self._refuse(unheld[fd])
        if hung_up:
            self._assign()

    def _refuse(self, listener: socket.socket) -> None:
        """No instance is up: the connection is closed at once."""
        try:
            connection_fd = accept_connection(listener.fileno())
        except OSError as error:
            # Out of descriptors or memory: say so, and take the next one when it comes.
            log.error("accepting a connection failed: %s", error)
            time.sleep(RECONNECT_INTERVAL_S)
            return
        if connection_fd >= 0:
            self.refused += 1  # before the close, which its client sees
            os.close(connection_fd)

    def stop(self) -> None:
        """Make serve_forever return."""
        self._stopping = True
        os.write(self._wakeup_write, b"x")

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        for instance in self.instances:
            instance.close()
        for fd in (self._wakeup_read, self._wakeup_write):
            os.close(fd)


def _bind(listen: tuple[str, int]) -> socket.socket:
    return socket.create_server(listen, backlog=BACKLOG, reuse_port=True)


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
