"""The payment-processor emulator, driven over HTTP in a child process (SPEC section 2)."""
import asyncio
import http.client
import json
import random
import socket
import time
from collections.abc import Callable, Iterator, Mapping

import aiohttp
import pytest

from conftest import random_uuid
from paycore.emulator import EmulatorProcess, PaymentStore
from paycore.emulator.wire import PaymentRequest

TOKEN = "123"
REQUESTED_AT = "2025-07-15T12:34:56.000Z"

StartEmulator = Callable[..., EmulatorProcess]


@pytest.fixture
def start_emulator() -> Iterator[StartEmulator]:
    started: list[EmulatorProcess] = []

    def start(*options: str) -> EmulatorProcess:
        emulator = EmulatorProcess("--fee", "0.07", *options)
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emulator(start_emulator: StartEmulator) -> EmulatorProcess:
    return start_emulator()


def payment_body(correlation_id: str, amount: str = "20.05", requested_at: str = REQUESTED_AT) -> bytes:
    """The amount is put into the JSON text verbatim, to control its exact digits."""
    return b'{"correlationId": "%s", "amount": %s, "requestedAt": "%s"}' % (
        correlation_id.encode(),
        amount.encode(),
        requested_at.encode(),
    )


def call(
    emulator: EmulatorProcess, method: str, path: str, body: bytes | dict | None = None, token: str | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    headers = {"X-Rinha-Token": token} if token is not None else {}
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def pay(emulator: EmulatorProcess, correlation_id: str, amount: str = "20.05", requested_at: str = REQUESTED_AT) -> int:
    status, _, _ = call(emulator, "POST", "/payments", payment_body(correlation_id, amount, requested_at))
    return status


def summary(emulator: EmulatorProcess, query: str = "") -> dict:
    status, _, body = call(emulator, "GET", f"/admin/payments-summary{query}", token=TOKEN)
    assert status == 200
    return json.loads(body)


async def timed_calls(
    emulator: EmulatorProcess, requests: list[tuple[str, str, bytes | None]]
) -> list[tuple[int, float, Mapping[str, str]]]:
    """Send all requests at once, each on its own connection: (status, seconds taken, headers)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:

        async def one(method: str, path: str, body: bytes | None) -> tuple[int, float, Mapping[str, str]]:
            started = time.monotonic()
            async with session.request(method, emulator.url + path, data=body) as response:
                await response.read()
                return response.status, time.monotonic() - started, response.headers

        return await asyncio.gather(*(one(*request) for request in requests))


def read_responses(connection: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """(status, body) of the next `count` responses on a raw connection."""
    buffer = b""
    responses = []
    while len(responses) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode().split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in head[1:])
            body_end = head_end + 4 + int(fields.get("content-length", "0"))
            if len(buffer) >= body_end:
                responses.append((int(head[0].split()[1]), buffer[head_end + 4 : body_end]))
                buffer = buffer[body_end:]
                continue
        chunk = connection.recv(65536)
        assert chunk, "connection closed early"
        buffer += chunk
    return responses


def test_processes_and_returns_a_payment(emulator: EmulatorProcess) -> None:
    correlation_id = str(random_uuid())
    status, _, body = call(emulator, "POST", "/payments", payment_body(correlation_id))
    assert (status, json.loads(body)) == (200, {"message": "payment processed successfully"})

    status, _, body = call(emulator, "GET", f"/payments/{correlation_id}")
    assert status == 200
    assert body == b'{"correlationId":"%s","amount":20.05,"requestedAt":"%s"}' % (
        correlation_id.encode(),
        REQUESTED_AT.encode(),
    )
    assert call(emulator, "GET", f"/payments/{random_uuid()}")[0] == 404
    assert call(emulator, "GET", "/payments/not-a-uuid")[0] == 400


def test_amount_is_rounded_from_its_decimal_text(emulator: EmulatorProcess) -> None:
    # 1.005 and 2.675 are just below their midpoints as binary floats, so rounding a float would go down.
    expected = {"1.005": b"1.01", "2.675": b"2.68", "0.1": b"0.10", "3": b"3.00", "1e1": b"10.00", "7.994999": b"7.99"}
    for amount, stored in expected.items():
        correlation_id = str(random_uuid())
        assert pay(emulator, correlation_id, amount) == 200
        assert b'"amount":%s,' % stored in call(emulator, "GET", f"/payments/{correlation_id}")[2]
    status, _, body = call(emulator, "GET", "/admin/payments-summary", token=TOKEN)
    assert b'"totalAmount":24.78,"totalRequests":6' in body


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"amount": 1, "requestedAt": "%s"}' % REQUESTED_AT.encode(),
        payment_body("not-a-uuid"),
        payment_body(str(random_uuid()), amount='"20.05"'),
        payment_body(str(random_uuid()), amount="true"),
        payment_body(str(random_uuid()), amount="NaN"),
        payment_body(str(random_uuid()), amount="1e40"),
        payment_body(str(random_uuid()), requested_at="2025-13-01T00:00:00.000Z"),
        payment_body(str(random_uuid()), requested_at="yesterday"),
        b'{"correlationId": "%s", "amount": 1}' % str(random_uuid()).encode(),
    ],
)
def test_rejects_malformed_payments(emulator: EmulatorProcess, body: bytes) -> None:
    assert call(emulator, "POST", "/payments", body)[0] == 400
    assert summary(emulator)["totalRequests"] == 0


def test_duplicate_correlation_id_is_422(emulator: EmulatorProcess) -> None:
    correlation_id = str(random_uuid())
    assert pay(emulator, correlation_id, "10.00") == 200
    status, _, body = call(emulator, "POST", "/payments", payment_body(correlation_id.upper(), "99.00"))
    assert status == 422
    assert "message" in json.loads(body)
    assert summary(emulator) == {"totalAmount": 10.0, "totalRequests": 1, "totalFee": 0.7, "feePerTransaction": 0.07}


def test_failure_mode_answers_500_and_stores_nothing(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--failure")
    correlation_id = str(random_uuid())
    status, _, body = call(emulator, "POST", "/payments", payment_body(correlation_id))
    assert (status, body) == (500, b"")
    assert call(emulator, "GET", f"/payments/{correlation_id}")[0] == 404
    assert json.loads(call(emulator, "GET", "/payments/service-health")[2]) == {"failing": True, "minResponseTime": 0}

    status, _, body = call(emulator, "PUT", "/admin/configurations/failure", {"failure": False}, TOKEN)
    assert (status, json.loads(body)) == (200, {"config": "failure", "was": True, "is": False})
    assert pay(emulator, correlation_id) == 200


def test_delay_is_honoured_and_reported(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--delay", "300")
    started = time.monotonic()
    assert pay(emulator, str(random_uuid())) == 200
    assert 0.28 <= time.monotonic() - started < 2.0
    assert json.loads(call(emulator, "GET", "/payments/service-health")[2]) == {"failing": False, "minResponseTime": 300}

    status, _, body = call(emulator, "PUT", "/admin/configurations/delay", {"delay": 0}, TOKEN)
    assert (status, json.loads(body)) == (200, {"config": "delay", "was": 300, "is": 0})
    started = time.monotonic()
    assert pay(emulator, str(random_uuid())) == 200
    assert time.monotonic() - started < 0.2
    assert call(emulator, "PUT", "/admin/configurations/delay", {"delay": -1}, TOKEN)[0] == 400
    assert call(emulator, "PUT", "/admin/configurations/delay", {"delay": "5"}, TOKEN)[0] == 400


def test_admission_beyond_inflight_and_queue_is_429(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--delay", "400", "--max-inflight", "2", "--max-queued", "2")
    payments = [("POST", "/payments", payment_body(str(random_uuid()))) for _ in range(6)]
    results = asyncio.run(timed_calls(emulator, payments))

    refused = [(seconds, headers) for status, seconds, headers in results if status == 429]
    processed = sorted(seconds for status, seconds, _ in results if status == 200)
    assert len(refused) == 2 and len(processed) == 4
    assert all(seconds < 0.3 and headers["Retry-After"] == "5" for seconds, headers in refused)
    assert 0.38 <= processed[0] and 0.75 <= processed[2] < 3.0
    assert summary(emulator)["totalRequests"] == 4


def test_admitted_payment_is_stored_when_its_client_hangs_up(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--delay", "300")
    correlation_id = str(random_uuid())
    body = payment_body(correlation_id)
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as connection:
        connection.sendall(b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.05)
    # Stored once its 300 ms are over, though nobody waits for the answer.
    deadline = time.monotonic() + 5
    while call(emulator, "GET", f"/payments/{correlation_id}")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_health_check_answers_once_per_window_with_a_line_of_two(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--health-interval", "0.5")
    started = time.monotonic()
    assert call(emulator, "GET", "/payments/service-health")[0] == 200
    assert time.monotonic() - started < 0.3

    results = asyncio.run(timed_calls(emulator, [("GET", "/payments/service-health", None)] * 3))
    refused = [seconds for status, seconds, _ in results if status == 429]
    answered = sorted(seconds for status, seconds, _ in results if status == 200)
    assert len(refused) == 1 and refused[0] < 0.3
    assert len(answered) == 2
    # One per window: the first waiter at the next window, the second one window later.
    assert 0.3 <= answered[0] < 0.9 and 0.4 <= answered[1] - answered[0] < 0.9


def test_health_waiter_that_hangs_up_leaves_the_line(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--health-interval", "0.6")
    assert call(emulator, "GET", "/payments/service-health")[0] == 200
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as connection:
        connection.sendall(b"GET /payments/service-health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
    time.sleep(0.1)
    results = asyncio.run(timed_calls(emulator, [("GET", "/payments/service-health", None)] * 3))
    assert sorted(status for status, _, _ in results) == [200, 200, 429]


def test_admin_needs_the_current_token(emulator: EmulatorProcess) -> None:
    admin_calls = [
        ("GET", "/admin/payments-summary", None),
        ("PUT", "/admin/configurations/token", {"token": "new"}),
        ("PUT", "/admin/configurations/delay", {"delay": 1}),
        ("PUT", "/admin/configurations/failure", {"failure": True}),
        ("POST", "/admin/purge-payments", None),
    ]
    for method, path, body in admin_calls:
        assert call(emulator, method, path, body)[0] == 401
        assert call(emulator, method, path, body, token="wrong")[0] == 401

    status, _, body = call(emulator, "PUT", "/admin/configurations/token", {"token": "s3cret"}, TOKEN)
    assert (status, body) == (204, b"")
    assert call(emulator, "GET", "/admin/payments-summary", token=TOKEN)[0] == 401
    assert call(emulator, "GET", "/admin/payments-summary", token="s3cret")[0] == 200
    assert call(emulator, "PUT", "/admin/configurations/token", {"token": 5}, "s3cret")[0] == 400


def test_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMULATOR_TOKEN", "from-env")
    monkeypatch.setenv("EMULATOR_DELAY", "7")
    with EmulatorProcess() as emulator:
        status, _, body = call(emulator, "GET", "/admin/payments-summary", token="from-env")
        assert status == 200 and json.loads(body)["feePerTransaction"] == 0.07
        assert json.loads(call(emulator, "GET", "/payments/service-health")[2])["minResponseTime"] == 7


def test_summary_bounds_are_inclusive_at_millisecond_precision(emulator: EmulatorProcess) -> None:
    for millisecond, amount in ((0, "1.00"), (1, "2.00"), (2, "4.00")):
        assert pay(emulator, str(random_uuid()), amount, f"2025-07-15T12:00:00.00{millisecond}Z") == 200
    at = "2025-07-15T12:00:00.00{}Z".format
    expectations = {
        "": (7.00, 3),
        f"?from={at(1)}&to={at(1)}": (2.00, 1),
        f"?from={at(0)}&to={at(1)}": (3.00, 2),
        f"?from={at(1)}": (6.00, 2),
        f"?to={at(1)}": (3.00, 2),
        f"?from={at(2)}&to={at(0)}": (0.00, 0),
        "?from=2025-07-15T09:00:00.001-03:00&to=2025-07-15T12:00:00.001999Z": (2.00, 1),
        "?from=2025-07-15T12%3A00%3A00.002Z&to=": (4.00, 1),
    }
    for query, (total_amount, total_requests) in expectations.items():
        result = summary(emulator, query)
        assert (result["totalAmount"], result["totalRequests"]) == (total_amount, total_requests), query
    assert call(emulator, "GET", "/admin/payments-summary?from=not-a-time", token=TOKEN)[0] == 400


def test_summary_amounts_are_exact_with_a_half_even_fee(emulator: EmulatorProcess) -> None:
    assert pay(emulator, str(random_uuid()), "1.50") == 200
    # 7% of 150 cents is 10.5 cents: half-even gives 10.
    body = call(emulator, "GET", "/admin/payments-summary", token=TOKEN)[2]
    assert body == b'{"totalAmount":1.50,"totalRequests":1,"totalFee":0.10,"feePerTransaction":0.07}'
    assert pay(emulator, str(random_uuid()), "0.70") == 200
    assert summary(emulator)["totalFee"] == 0.15  # 15.4 cents


def test_purge_clears_every_payment(emulator: EmulatorProcess) -> None:
    correlation_id = str(random_uuid())
    assert pay(emulator, correlation_id) == 200
    status, _, body = call(emulator, "POST", "/admin/purge-payments", token=TOKEN)
    assert (status, json.loads(body)) == (200, {"message": "All payments purged."})
    assert summary(emulator)["totalRequests"] == 0
    assert call(emulator, "GET", f"/payments/{correlation_id}")[0] == 404
    assert pay(emulator, correlation_id) == 200


def test_unknown_paths_wrong_methods_and_oversized_bodies(emulator: EmulatorProcess) -> None:
    assert call(emulator, "GET", "/nowhere")[0] == 404
    assert call(emulator, "GET", "/payments/a/b")[0] == 404
    status, headers, _ = call(emulator, "GET", "/payments")
    assert (status, headers["Allow"]) == (405, "POST")
    assert call(emulator, "POST", "/payments/service-health")[0] == 405
    assert call(emulator, "GET", "/admin/purge-payments", token=TOKEN)[0] == 405

    body = b"x" * (1024 * 1024 + 1)
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as connection:
        connection.sendall(b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert read_responses(connection, 1)[0][0] == 413


def test_pipelined_requests_are_answered_in_order(start_emulator: StartEmulator) -> None:
    emulator = start_emulator("--delay", "200")
    correlation_id = str(random_uuid())
    body = payment_body(correlation_id)
    requests = (
        b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"GET /payments/%s HTTP/1.1\r\nHost: x\r\n\r\n" % correlation_id.encode()
        + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"this is not HTTP\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as connection:
        connection.sendall(requests)
        statuses = [status for status, _ in read_responses(connection, 4)]
        assert statuses == [200, 200, 404, 400]
        assert connection.recv(1) == b""  # closed after the malformed request


def test_a_payments_file_keeps_every_payment_answered_200_across_a_kill(tmp_path) -> None:
    payments_file = str(tmp_path / "default.log")
    kept = [str(random_uuid()) for _ in range(3)]
    with EmulatorProcess("--payments-file", payments_file) as emulator:
        for number, correlation_id in enumerate(kept):
            assert pay(emulator, correlation_id, f"1.0{number}", f"2025-07-15T12:00:00.00{number}Z") == 200
        before = summary(emulator)
        assert (before["totalRequests"], before["totalAmount"]) == (3, 3.03)
        emulator.kill()
    with EmulatorProcess("--payments-file", payments_file) as emulator:
        assert summary(emulator) == before
        assert summary(emulator, "?from=2025-07-15T12:00:00.001Z")["totalRequests"] == 2
        status, _, body = call(emulator, "GET", f"/payments/{kept[1]}")
        assert (status, json.loads(body)) == (200, {"correlationId": kept[1], "amount": 1.01,
                                                    "requestedAt": "2025-07-15T12:00:00.001Z"})
        assert pay(emulator, kept[0]) == 422
        assert call(emulator, "POST", "/admin/purge-payments", token=TOKEN)[0] == 200
        emulator.kill()
    with EmulatorProcess("--payments-file", payments_file) as emulator:
        assert summary(emulator)["totalRequests"] == 0
        assert pay(emulator, kept[0]) == 200


def test_a_line_torn_by_a_kill_is_dropped_and_the_file_goes_on(tmp_path) -> None:
    payments_file = tmp_path / "default.log"
    whole = str(random_uuid())
    payments_file.write_text(f"{whole} 2005 {REQUESTED_AT}\n{random_uuid()} 20")
    with EmulatorProcess("--payments-file", str(payments_file)) as emulator:
        assert summary(emulator)["totalRequests"] == 1
        assert pay(emulator, str(random_uuid())) == 200
        emulator.kill()
    with EmulatorProcess("--payments-file", str(payments_file)) as emulator:
        assert summary(emulator)["totalRequests"] == 2
        assert pay(emulator, whole) == 422


def test_exits_cleanly_on_sigterm() -> None:
    emulator = EmulatorProcess()
    assert emulator.stop() == 0


def test_store_totals_match_a_plain_count() -> None:
    generator = random.Random(2025)
    store = PaymentStore()
    start_us = 1_752_000_000_000_000
    payments = []
    for number in range(100_000):
        # Mostly in order, as a live load sends them, with some stragglers and shared milliseconds.
        requested_at_us = start_us + number * 3_000 + generator.choice((0, 0, 0, -50_000, 1_000))
        payment = PaymentRequest(f"id-{number}", generator.randint(1, 10_000), "", requested_at_us)
        payments.append(payment)
        assert store.add(payment)
    assert not store.add(payments[0])

    for _ in range(30):
        first, last = sorted(generator.choice(payments).requested_at_us for _ in range(2))
        for bounds in ((first, last), (None, last), (first, None)):
            low, high = bounds[0] or 0, bounds[1] or start_us * 2
            in_range = [payment.cents for payment in payments if low <= payment.requested_at_us <= high]
            assert store.totals(*bounds) == (len(in_range), sum(in_range))
