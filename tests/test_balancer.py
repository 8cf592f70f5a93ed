"""The load balancer (service/balancer.py) and the instances' end of the hand-off
(service/handoff.py, pyx/socket_handoff.pyx): one listening socket on the
port per instance, connections spread over them by the kernel and accepted
by the instances themselves, never relayed, and what happens when an
instance is not there."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvloop

from conftest import wait_until
from paycore.core.socket_handoff import accept_connection, receive_sockets, send_socket
from paycore.ready import start_listening
from paycore.service.balancer import Balancer
from paycore.service.handoff import HandoffListener


class Named(asyncio.Protocol):
    """Answers every read with its instance's name; hangs up on b"bye"."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.name)
        if data == b"bye":
            self.transport.close()


class Instance:
    """A hand-off listener in an event loop of its own thread, as an instance
    process has one."""

    def __init__(self, path: str, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.listener: HandoffListener = self.run(lambda: HandoffListener(path, lambda: Named(name.encode())))
        self.accepting = True

    def run(self, function):
        async def call():
            return function()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(5)

    def handed_over(self) -> bool:
        """Whether it holds a listening socket from a balancer."""
        return self.run(lambda: self.listener.listening_sockets > 0)

    @contextmanager
    def busy(self, then=None):
        """Its loop held: it accepts nothing meanwhile. then() runs when it is
        released, before the loop looks at its sockets again."""
        release = threading.Event()
        held = threading.Event()

        def hold() -> None:
            held.set()
            release.wait(10)
            if then is not None:
                then()

        self.loop.call_soon_threadsafe(hold)
        held.wait(5)
        try:
            yield
        finally:
            release.set()

    def close_listener(self) -> None:
        """In its loop, as SIGTERM does: no new connections; its loop serves on."""
        if self.accepting:
            self.accepting = False
            self.listener.close()

    def stop_accepting(self) -> None:
        self.run(self.close_listener)

    def close(self) -> None:
        self.stop_accepting()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Instances:
    """Instances started and stopped by name, each on its own hand-off socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: dict[str, Instance] = {}

    def path(self, name: str) -> str:
        return str(self.directory / f"{name}.handoff")

    def start(self, name: str) -> Instance:
        self.running[name] = Instance(self.path(name), name)
        return self.running[name]

    def stop(self, name: str) -> None:
        self.running.pop(name).close()

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)


@pytest.fixture
def instances(tmp_path):
    running = Instances(tmp_path)
    yield running
    running.close()


def end(balancer: Balancer) -> None:
    """Stop a balancer that serve() started, and close it once it returned."""
    balancer.stop()
    balancer.thread.join(5)
    assert not balancer.thread.is_alive()
    balancer.close()


@pytest.fixture
def balance(instances):
    balancers: list[Balancer] = []

    def serve(*names: str, port: int = 0) -> Balancer:
        """A balancer serving in a thread of its own, once the instances up hold its socket."""
        balancer = Balancer(("127.0.0.1", port), [instances.path(name) for name in names])
        balancer.thread = threading.Thread(target=balancer.serve_forever, daemon=True)
        balancer.thread.start()
        balancers.append(balancer)
        for name in names:
            if name in instances.running:
                wait_until(instances.running[name].handed_over)
        return balancer

    yield serve
    for balancer in balancers:
        if balancer.thread.is_alive():
            end(balancer)


def ask(balancer: Balancer, message: bytes = b"who") -> bytes:
    """The name of the instance that answers on a new connection."""
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(message)
        return client.recv(64)


# Connections spread over the sockets by a hash of their addresses: this many
# all going to one of two instances happens once in 2**39 runs.
SPREAD = 40


def names_answering(balancer: Balancer) -> set[bytes]:
    return {ask(balancer) for _ in range(SPREAD)}


def test_connections_spread_over_the_instances_and_each_is_served_by_one_alone(instances, balance):
    instances.start("a")
    instances.start("b")
    balancer = balance("a", "b")
    assert names_answering(balancer) == {b"a", b"b"}
    # The balancer kept no copy: when the instance hangs up, the client sees the end at once.
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"bye")
        assert client.recv(64) in (b"a", b"b")
        assert client.recv(64) == b""
    assert balancer.refused == 0


def test_a_keep_alive_connection_stays_with_its_instance(instances, balance):
    instances.start("a")
    instances.start("b")
    balancer = balance("a", "b")
    with socket.create_connection(balancer.address, timeout=5) as client:
        answers = set()
        for _ in range(5):
            client.sendall(b"who")
            answers.add(client.recv(64))
    assert len(answers) == 1


def test_an_instance_that_is_down_leaves_its_share_to_the_others_until_it_listens(instances, balance):
    instances.start("a")
    balancer = balance("a", "b")
    assert names_answering(balancer) == {b"a"}
    b = instances.start("b")
    wait_until(b.handed_over)  # the balancer tried again within RECONNECT_INTERVAL_S
    # "a" gave back b's socket: it holds its own alone again.
    wait_until(lambda: instances.running["a"].run(lambda: instances.running["a"].listener.listening_sockets) == 1)
    assert names_answering(balancer) == {b"a", b"b"}
    instances.stop("b")
    assert names_answering(balancer) == {b"a"}
    assert balancer.refused == 0


def test_connections_waiting_for_an_instance_that_goes_away_are_served_by_another(instances, balance):
    """The balancer keeps every socket open: what waits in the queue of an
    instance that stops accepting is not lost but handed on with the socket."""
    instances.start("a")
    b = instances.start("b")
    balancer = balance("a", "b")
    with b.busy(then=b.close_listener):
        clients = [socket.create_connection(balancer.address, timeout=5) for _ in range(SPREAD)]
        for client in clients:
            client.sendall(b"who")
    try:
        assert {client.recv(64) for client in clients} == {b"a"}
    finally:
        for client in clients:
            client.close()
    assert balancer.refused == 0


def assert_closed_at_once(balancer: Balancer) -> None:
    refused = balancer.refused
    started = time.monotonic()
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"who")
        try:
            assert client.recv(64) == b""
        except ConnectionResetError:
            pass  # the balancer closed it with the request unread
    assert time.monotonic() - started < 1
    assert balancer.refused == refused + 1


def test_with_no_instance_a_connection_is_closed_at_once(balance):
    assert_closed_at_once(balance("a", "b"))


def test_an_instance_that_stops_serves_its_connections_and_leaves_new_ones_to_the_others(instances, balance):
    a, b = instances.start("a"), instances.start("b")
    balancer = balance("a", "b")
    clients = [socket.create_connection(balancer.address, timeout=5) for _ in range(SPREAD)]
    try:
        for client in clients:
            client.sendall(b"who")
        served_by_a = [client for client in clients if client.recv(64) == b"a"]
        assert served_by_a
        a.stop_accepting()
        for client in served_by_a:
            client.sendall(b"who")
            assert client.recv(64) == b"a"
    finally:
        for client in clients:
            client.close()
    assert names_answering(balancer) == {b"b"}
    assert balancer.refused == 0


def test_when_the_last_instance_stops_the_balancer_closes_what_waits(instances, balance):
    instances.start("a")
    balancer = balance("a")
    instances.stop("a")
    wait_until(lambda: balancer.instances[0].channel is None)
    assert_closed_at_once(balancer)


def test_the_wire_ends_of_the_hand_off():
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    receiver.setblocking(False)
    read_end, write_end = os.pipe()
    try:
        assert receive_sockets(receiver.fileno()) == ([], False)
        send_socket(sender.fileno(), write_end)
        send_socket(sender.fileno(), write_end)
        fds, closed = receive_sockets(receiver.fileno())
        assert len(fds) == 2 and not closed
        for fd in fds:  # each is a descriptor of its own on the same pipe
            assert fd != write_end
            os.write(fd, b"x")
            os.close(fd)
        assert os.read(read_end, 2) == b"xx"
        sender.close()
        assert receive_sockets(receiver.fileno()) == ([], True)
        with pytest.raises(BrokenPipeError):
            send_socket(receiver.fileno(), write_end)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        receiver.close()


def test_accepting_takes_one_connection_or_says_none_is_waiting():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        assert accept_connection(server.fileno()) == -1
        with socket.create_connection(server.getsockname(), timeout=5):
            fd = accept_connection(server.fileno())
            assert fd >= 0
            os.close(fd)
        assert accept_connection(server.fileno()) == -1


def test_the_balancer_process_stops_on_sigterm(tmp_path):
    process, _ = start_listening(
        [sys.executable, "-m", "paycore.service.balancer"], 15,
        env={**os.environ, "PAYCORE_BALANCER_LISTEN": "127.0.0.1:0",
             "PAYCORE_BALANCER_INSTANCES": str(tmp_path / "a.handoff")},
        stderr=subprocess.PIPE)
    try:
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 0
    finally:
        process.kill()
        process.wait()


def test_the_balancer_refuses_to_start_without_instances():
    finished = subprocess.run([sys.executable, "-m", "paycore.service.balancer"],
                              env={**os.environ, "PAYCORE_BALANCER_INSTANCES": ""},
                              capture_output=True, text=True, timeout=30)
    assert finished.returncode != 0
    assert "PAYCORE_BALANCER_INSTANCES" in finished.stderr


def test_a_handshake_that_fails_is_logged_and_the_listener_serves_on(instances, balance, caplog):
    instances.start("a")
    balancer = balance("a")

    def failing_factory() -> asyncio.Protocol:
        raise RuntimeError("no protocol today")

    listener = instances.running["a"].listener
    serving = listener._protocol_factory
    listener._protocol_factory = failing_factory
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"who")
        try:
            assert client.recv(64) == b""  # the connection is dropped, not left hanging
        except ConnectionResetError:
            pass
    assert "could not serve a connection" in caplog.text
    listener._protocol_factory = serving
    assert ask(balancer) == b"a"


def test_connections_outlive_the_balancer_that_handed_them_over(instances, balance):
    instances.start("a")
    balancer = balance("a")
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"who")
        assert client.recv(64) == b"a"
        end(balancer)
        client.sendall(b"who")
        assert client.recv(64) == b"a"


def test_a_balancer_started_again_takes_the_port_back(instances, balance):
    """The instances let go of the listening sockets when their balancer
    hangs up; the next one binds the same port and hands over its own."""
    instances.start("a")
    first = balance("a")
    port = first.address[1]
    end(first)
    second = balance("a", port=port)
    assert second.address[1] == port
    assert ask(second) == b"a"
