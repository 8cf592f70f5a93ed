"""Slow, idle and oversized clients are bounded and do not hold up the others."""
from __future__ import annotations

import select
import socket
import time

import pytest
from conftest import call, quick_stack, random_uuid
from test_service import payment

HALF_SENT = b"POST /payments HTTP/1.1\r\nHost: paycore\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def strict():
    with quick_stack(PAYCORE_CLIENT_REQUEST_TIMEOUT_MS="1000", PAYCORE_CLIENT_IDLE_TIMEOUT_MS="1500",
                     PAYCORE_MAX_HEAD_BYTES="2048") as live:
        yield live


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return received
        received += chunk


def test_hundreds_of_idle_and_half_sent_connections_do_not_hold_up_others(strict):
    live = strict
    live.reset()
    idle = [connect(live.port) for _ in range(150)]
    half_sent = [connect(live.port) for _ in range(150)]
    for sock in half_sent:
        sock.sendall(HALF_SENT)
    client = live.client()
    started = time.monotonic()
    for _ in range(50):
        assert call(client, "POST", "/payments", payment())[0] == 202
    assert time.monotonic() - started < 5  # 50 answers, not one timeout's worth of waiting
    # The slow ones are cut off after their time: the half-sent with a 408.
    for sock in half_sent:
        answer = read_until_closed(sock, timeout_s=5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    for sock in idle:
        assert read_until_closed(sock, timeout_s=5) == b""
    for sock in (*idle, *half_sent):
        sock.close()
    live.wait_until_processed(50)


def test_a_request_trickled_byte_by_byte_is_cut_off(strict):
    """Slowloris: each byte is activity, but the request as a whole is late."""
    sock = connect(strict.port)
    deadline = time.monotonic() + 4
    for byte in HALF_SENT * 10:
        if select.select([sock], [], [], 0.05)[0] or time.monotonic() > deadline:
            break
        sock.sendall(bytes([byte]))
    assert read_until_closed(sock, timeout_s=1).startswith(b"HTTP/1.1 408 ")
    sock.close()


def test_an_oversized_head_is_refused(strict):
    client = strict.client()
    status, body = call(client, "POST", "/payments", payment(), {"X-Padding": "a" * 3000})
    assert status == 431 and "too large" in body["error"]
    status, body = call(strict.client(), "GET", "/payments-summary?from=" + "9" * 3000)
    assert status == 431


def test_a_connection_may_rest_between_requests_within_its_idle_time(strict):
    client = strict.client()
    assert call(client, "POST", "/payments", payment())[0] == 202
    time.sleep(0.5)
    assert call(client, "POST", "/payments", payment())[0] == 202


def test_connections_beyond_the_limit_are_refused_and_the_rest_served():
    with quick_stack(PAYCORE_MAX_CONNECTIONS="20") as live:
        held = [live.instance(1) for _ in range(20)]
        for connection in held:
            connection.connect()
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(live.stack.socket_path(1))
        answer = read_until_closed(extra, timeout_s=5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
        assert call(held[0], "POST", "/payments", payment(str(random_uuid())))[0] == 202
        for connection in held[:5]:
            connection.close()
        time.sleep(0.2)
        assert call(live.instance(1), "GET", "/payments-summary")[0] == 200


def test_a_request_asking_for_a_protocol_switch_gets_one_answer_then_a_hang_up(strict):
    sock = connect(strict.port)
    sock.sendall(b"GET /payments-summary HTTP/1.1\r\nHost: paycore\r\n"
                 b"Connection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    answer = read_until_closed(sock, timeout_s=5)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    sock.close()
