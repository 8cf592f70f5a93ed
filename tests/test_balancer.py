"""The load balancer (service/balancer.py) and the instances' end of the hand-off
(service/handoff.py, pyx/connection_handoff.pyx): client connections handed
over round robin, never relayed, and what happens when an instance cannot
take them."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvloop

from paycore.core.connection_handoff import receive_connections, send_connection
from paycore.ready import start_listening
from paycore.service.balancer import RECONNECT_INTERVAL_S, Balancer
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


class Instances:
    """Hand-off listeners in an event loop of their own thread, started and stopped by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loop = uvloop.new_event_loop()
        self.listeners: dict[str, HandoffListener] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def path(self, name: str) -> str:
        return str(self.directory / f"{name}.handoff")

    def run(self, function, *args):
        async def call():
            return function(*args)
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(5)

    def start(self, name: str) -> None:
        def start() -> None:
            self.listeners[name] = HandoffListener(self.path(name), lambda: Named(name.encode()))
        self.run(start)

    def stop(self, name: str) -> None:
        self.run(self.listeners.pop(name).close)

    def close(self) -> None:
        for name in list(self.listeners):
            self.stop(name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def instances(tmp_path):
    running = Instances(tmp_path)
    yield running
    running.close()


@pytest.fixture
def balance(instances):
    balancers: list[tuple[Balancer, threading.Thread]] = []

    def start(*names: str) -> Balancer:
        balancer = Balancer(("127.0.0.1", 0), [instances.path(name) for name in names])
        thread = threading.Thread(target=balancer.serve_forever, daemon=True)
        thread.start()
        balancers.append((balancer, thread))
        return balancer

    yield start
    for balancer, thread in balancers:
        balancer.stop()
        thread.join(5)
        assert not thread.is_alive()
        balancer.close()


def ask(balancer: Balancer, message: bytes = b"who") -> bytes:
    """The name of the instance that answers on a new connection."""
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(message)
        return client.recv(64)


def test_connections_go_round_robin_and_are_served_by_the_instance_alone(instances, balance):
    instances.start("a")
    instances.start("b")
    balancer = balance("a", "b")
    assert [ask(balancer) for _ in range(6)] == [b"a", b"b"] * 3
    # The balancer kept no copy: when the instance hangs up, the client sees the end at once.
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"bye")
        assert client.recv(64) in (b"a", b"b")
        assert client.recv(64) == b""


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


def test_an_instance_that_is_down_is_skipped_and_taken_back_when_it_listens(instances, balance):
    instances.start("a")
    balancer = balance("a", "b")
    assert {ask(balancer) for _ in range(4)} == {b"a"}
    instances.start("b")
    time.sleep(RECONNECT_INTERVAL_S * 1.5)
    assert {ask(balancer) for _ in range(4)} == {b"a", b"b"}
    instances.stop("b")
    assert {ask(balancer) for _ in range(4)} == {b"a"}
    assert balancer.refused == 0


def test_with_no_instance_a_connection_is_closed_at_once(balance):
    balancer = balance("a", "b")
    started = time.monotonic()
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"who")
        try:
            assert client.recv(64) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - started < 1
    assert balancer.refused == 1


def test_an_instance_whose_queue_is_full_is_passed_over(instances, balance):
    # "stuck" takes the channel and never reads from it: its queue fills (a few hundred).
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck.bind(instances.path("stuck"))
    stuck.listen(1)
    instances.start("a")
    balancer = balance("stuck", "a")
    try:
        # Closed at once, so that this process does not run out of descriptors:
        # a connection waiting in stuck's queue takes room there all the same.
        for _ in range(1500):
            socket.create_connection(balancer.address, timeout=5).close()
        assert {ask(balancer) for _ in range(6)} == {b"a"}
        assert balancer.refused == 0
    finally:
        stuck.close()


def test_closing_a_listener_serves_the_connections_already_handed_over(instances):
    instances.start("a")
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel.connect(instances.path("a"))
    server = socket.create_server(("127.0.0.1", 0))
    clients = []
    try:
        def hand_over_then_close() -> None:
            # In the instance's own loop: nothing is read from the channel before close().
            for _ in range(3):
                client = socket.create_connection(server.getsockname(), timeout=5)
                accepted, _ = server.accept()
                send_connection(channel.fileno(), accepted.fileno())
                accepted.close()
                clients.append(client)
            instances.listeners.pop("a").close()
        instances.run(hand_over_then_close)
        for client in clients:
            client.sendall(b"who")
            assert client.recv(64) == b"a"
    finally:
        for client in clients:
            client.close()
        channel.close()
        server.close()


def test_the_wire_ends_of_the_hand_off():
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    receiver.setblocking(False)
    read_end, write_end = os.pipe()
    try:
        assert receive_connections(receiver.fileno()) == ([], False)
        send_connection(sender.fileno(), write_end)
        send_connection(sender.fileno(), write_end)
        fds, closed = receive_connections(receiver.fileno())
        assert len(fds) == 2 and not closed
        for fd in fds:  # each is a descriptor of its own on the same pipe
            assert fd != write_end
            os.write(fd, b"x")
            os.close(fd)
        assert os.read(read_end, 2) == b"xx"
        sender.close()
        assert receive_connections(receiver.fileno()) == ([], True)
        with pytest.raises(BrokenPipeError):
            send_connection(receiver.fileno(), write_end)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        receiver.close()


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

    listener = instances.listeners["a"]
    serving = listener._protocol_factory
    listener._protocol_factory = failing_factory
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"who")
        try:
            assert client.recv(64) == b""  # the connection is dropped, not left hanging
        except ConnectionResetError:
            pass
    assert "could not serve a handed-over connection" in caplog.text
    listener._protocol_factory = serving
    assert ask(balancer) == b"a"


def test_connections_outlive_the_balancer_that_handed_them_over(instances, balance):
    instances.start("a")
    balancer = balance("a")
    with socket.create_connection(balancer.address, timeout=5) as client:
        client.sendall(b"who")
        assert client.recv(64) == b"a"
        balancer.stop()
        balancer.close()
        client.sendall(b"who")
        assert client.recv(64) == b"a"
