"""The benchmark's checker (perf/scenario.py) times its calls to the summary and
purge endpoints as the generator times POST /payments: to the arrival of the
answer, not to the moment its thread got round to reading it."""
from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

PERF = Path(__file__).resolve().parent.parent / "perf"
sys.path.insert(0, str(PERF))

from scenario import SO_TIMESTAMPNS, HttpJson, _receive  # noqa: E402

ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
LATE_READ_S = 0.3


class AnswerEveryRequest(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(65536):
            self.request.sendall(ANSWER)


def receive_timestamps_on(address: tuple[str, int]) -> socket.socket:
    """A connection whose answers carry kernel timestamps: the kernel turns them on
    for the whole host a moment after the first socket asks, and keeps them on
    while this socket lives."""
    connection = socket.create_connection(address, timeout=5)
    connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        if _receive(connection)[1] is not None:
            return connection
        time.sleep(0.01)
    raise AssertionError("no kernel receive timestamps within 5 s")


def test_a_call_is_timed_to_the_arrival_of_its_answer_not_to_a_late_read(monkeypatch) -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), AnswerEveryRequest) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with receive_timestamps_on(server.server_address):
                read_response = HttpJson._read_response

                def late_read(connection: socket.socket):
                    time.sleep(LATE_READ_S)  # the answer is in the socket long before this
                    return read_response(connection)

                monkeypatch.setattr(HttpJson, "_read_response", staticmethod(late_read))
                host, port = server.server_address
                client = HttpJson(f"http://{host}:{port}")
                started = time.monotonic()
                status, body, elapsed = client.call("GET", "/payments-summary")
                assert time.monotonic() - started >= LATE_READ_S
                assert (status, body) == (200, {"ok": True})
                assert elapsed < LATE_READ_S / 3
        finally:
            server.shutdown()
