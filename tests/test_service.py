"""End-to-end: the service through the load balancer, real emulated processors, two instances."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from conftest import RunningStack, call, random_uuid

ZERO = {"default": {"totalRequests": 0, "totalAmount": 0},
        "fallback": {"totalRequests": 0, "totalAmount": 0}}


def payment(correlation_id: str | None = None, amount: str = "20.05") -> bytes:
    return b'{"correlationId":"%s","amount":%s}' % (
        (correlation_id or str(random_uuid())).encode(), amount.encode())


async def post_many(port: int, bodies: list[bytes], concurrency: int = 50) -> list[int]:
    """POST every body through the load balancer; the statuses in order."""
    statuses = [0] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as session:
        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                async with session.post("/payments", data=bodies[index],
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    statuses[index] = response.status
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def accept_all(live: RunningStack, count: int, concurrency: int = 50) -> list[str]:
    ids = [str(random_uuid()) for _ in range(count)]
    statuses = asyncio.run(post_many(live.port, [payment(i) for i in ids], concurrency))
    assert all(200 <= status < 300 for status in statuses), set(statuses)
    return ids


def as_summary(processors: dict) -> dict:
    return {name: {"totalRequests": report["totalRequests"], "totalAmount": report["totalAmount"]}
            for name, report in processors.items()}


def assert_ledgers_match_processors(live: RunningStack, query: str = "") -> dict:
    expected = as_summary(live.processors_summary(query))
    for answer in live.summaries(query):
        assert answer == expected
    return expected


def assert_ledgers_catch_up(live: RunningStack, query: str = "", timeout_s: float = 15.0) -> dict:
    """The ledgers agree with the processors within timeout_s. The outcome reaches
    a ledger after the processor answers: at once when the answer arrives; for a
    payment whose answer was lost, or whose SETTLED record had not been written
    when its instance died, from a resend or a lookup, a few backoffs later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return assert_ledgers_match_processors(live, query)
        except AssertionError:
            time.sleep(0.2)
    return assert_ledgers_match_processors(live, query)


# --- endpoints -------------------------------------------------------------

def test_payment_is_accepted_then_processed_by_default(live):
    correlation_id = str(random_uuid())
    status, _ = call(live.client(), "POST", "/payments", payment(correlation_id))
    assert status == 202
    processed = live.wait_until_processed(1)
    assert processed["default"]["totalRequests"] == 1
    assert processed["default"]["totalAmount"] == 20.05
    held = live.default.held(correlation_id)
    assert held["amount"] == 20.05
    assert assert_ledgers_catch_up(live)["default"] == {"totalRequests": 1, "totalAmount": 20.05}


def test_summary_shape_and_purge(live):
    accept_all(live, 3)
    live.wait_until_processed(3)
    status, summary = call(live.client(), "GET", "/payments-summary")
    assert status == 200
    assert summary == {"default": {"totalRequests": 3, "totalAmount": 60.15},
                       "fallback": {"totalRequests": 0, "totalAmount": 0}}
    status, _ = call(live.client(), "POST", "/purge-payments", headers=live.admin_headers)
    assert status == 200
    assert live.summaries() == [ZERO, ZERO]


WRONG_ROUTES = [
    ("GET", "/nope", 404), ("GET", "/", 404), ("GET", "/payments/extra", 400),
    ("POST", "/payments/extra", 405), ("GET", "/payments", 405), ("PUT", "/payments", 405),
    ("POST", "/payments-summary", 405), ("GET", "/purge-payments", 405),
]


@pytest.mark.parametrize("method, path, status", WRONG_ROUTES)
def test_unknown_paths_and_wrong_methods(live, method, path, status):
    code, body = call(live.client(), method, path, b"{}" if method != "GET" else None)
    assert code == status
    assert "error" in body


def test_keep_alive_serves_many_requests_on_one_connection(live):
    connection = live.client()
    for _ in range(50):
        assert call(connection, "GET", "/payments-summary")[0] == 200
        assert call(connection, "POST", "/payments", payment())[0] == 202
    live.wait_until_processed(50)


# --- bad input changes nothing --------------------------------------------

ID = str(random_uuid())
MALFORMED = [
    (b"", 400), (b"{", 400), (b"not json", 400), (b"[]", 422), (b"null", 422), (b"{}", 422),
    (b'{"amount": 20.05}', 422),
    (b'{"correlationId": "%s"}' % ID.encode(), 422),
    (b'{"correlationId": 42, "amount": 20.05}', 422),
    (b'{"correlationId": null, "amount": 20.05}', 422),
    (b'{"correlationId": "not-a-uuid", "amount": 20.05}', 422),
    (b'{"correlationId": "%s", "amount": 20.05}' % ID[:-1].encode(), 422),
    (b'{"correlationId": "%s", "amount": 20.05}' % ID.replace("-", "").encode(), 422),
    (b'{"correlationId": "%s", "amount": "20.05"}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": true}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": -20.05}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": 0}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": 0.00}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": 20.055}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": 1e300}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": 20.05,}' % ID.encode(), 400),
    (b'{"correlationId": "%s", "amount": 20.05} trailing' % ID.encode(), 400),
    (b'{"correlationId": "%s", "amount": 20.05, "amount": 1}' % ID.encode(), 422),
    (b'{"correlationId": "%s", "amount": 20.05}' % ID.encode() + b" " * (17 * 1024), 413),
]


def test_malformed_requests_are_refused_and_change_nothing(live):
    assert len(MALFORMED) >= 20
    before = live.summaries()
    connection = live.client()
    for body, expected in MALFORMED:
        status, answer = call(connection, "POST", "/payments", body,
                              {"Content-Type": "application/json"})
        assert status == expected, body[:80]
        assert isinstance(answer, dict) and answer["error"], body[:80]
    time.sleep(0.5)
    assert live.summaries() == before == [ZERO, ZERO]
    assert as_summary(live.processors_summary()) == ZERO
    assert live.default.held(ID) is None and live.fallback.held(ID) is None


def test_bad_summary_bounds_are_refused(live):
    for query in ("?from=yesterday", "?to=2025-13-01T00:00:00Z", "?from=2025-08-21T05:16:05.965Z&to=x"):
        status, body = call(live.client(), "GET", "/payments-summary" + query)
        assert status == 400 and "error" in body


# --- duplicates --------------------------------------------------------------

def test_same_correlation_id_twice_is_processed_once(live):
    correlation_id = str(random_uuid())
    # Round robin sends the two posts to different instances: both must know.
    statuses = [call(live.client(), "POST", "/payments", payment(correlation_id))[0] for _ in range(4)]
    assert statuses[0] == 202 and all(200 <= status < 300 for status in statuses)
    status, answer = call(live.client(), "POST", "/payments", payment(correlation_id, "99.99"))
    assert status == 409 and "different amount" in answer["error"]
    live.wait_until_processed(1)
    time.sleep(0.5)  # room for a second payment, if one were wrongly made
    assert as_summary(live.processors_summary())["default"] == {"totalRequests": 1, "totalAmount": 20.05}
    assert_ledgers_catch_up(live)


# --- routing through faults ------------------------------------------------

def test_default_failing_sends_to_fallback(live):
    live.default.set_failure(True)
    ids = accept_all(live, 200)
    processed = live.wait_until_processed(200)
    assert processed["fallback"]["totalRequests"] + processed["default"]["totalRequests"] == 200
    assert processed["default"]["totalRequests"] == 0
    assert_ledgers_catch_up(live)
    assert all(live.default.held(i) is None for i in ids[:20])


def test_slow_default_loses_to_fast_fallback(live):
    live.default.set_delay(2500)
    time.sleep(1.5)  # two health windows
    accept_all(live, 100)
    processed = live.wait_until_processed(100)
    assert processed["fallback"]["totalRequests"] >= 90
    assert_ledgers_catch_up(live)


def test_both_failing_loses_nothing_and_recovers(live):
    live.default.set_failure(True)
    live.fallback.set_failure(True)
    ids = accept_all(live, 300)
    time.sleep(2)
    assert as_summary(live.processors_summary()) == ZERO
    live.default.set_failure(False)
    processed = live.wait_until_processed(300)
    total = processed["default"]["totalRequests"] + processed["fallback"]["totalRequests"]
    assert total == 300
    assert_ledgers_catch_up(live)
    assert all((live.default.held(i) is None) != (live.fallback.held(i) is None) for i in ids)


# --- summary ranges --------------------------------------------------------

def test_summary_range_edges_are_inclusive_to_the_millisecond(live):
    ids = accept_all(live, 40, concurrency=4)
    live.wait_until_processed(40)
    assert_ledgers_catch_up(live)
    stamps = sorted(live.default.held(i)["requestedAt"] for i in ids)
    first, middle, last = stamps[0], stamps[len(stamps) // 2], stamps[-1]

    def count(query: str) -> int:
        answers = live.summaries(query)
        assert answers[0] == answers[1]
        return answers[0]["default"]["totalRequests"]

    def shifted(stamp: str, ms: int) -> str:
        from paycore.core.timestamp import format_timestamp, parse_timestamp
        return format_timestamp(parse_timestamp(stamp) + ms)

    assert count("") == 40
    assert count(f"?from={first}&to={last}") == 40
    assert count(f"?from={middle}&to={middle}") == stamps.count(middle)
    assert count(f"?from={shifted(first, 1)}") == 40 - stamps.count(first)
    assert count(f"?to={shifted(last, -1)}") == 40 - stamps.count(last)
    assert count(f"?from={middle}") == sum(stamp >= middle for stamp in stamps)
    assert count(f"?to={middle}") == sum(stamp <= middle for stamp in stamps)
    assert count(f"?from={last}&to={first}") == (40 if first == last else 0)
    # A bound finer than a millisecond: from rounds up, to rounds down.
    assert count(f"?from={first[:-1]}0001Z") == 40 - stamps.count(first)
    assert count(f"?to={last[:-1]}9999Z") == 40
    assert_ledgers_match_processors(live, f"?from={middle}&to={last}")


# --- a mixed-fault run -----------------------------------------------------

def test_mixed_fault_run_ledgers_equal_processors(live):
    phases = [
        lambda: live.default.set_delay(300),
        lambda: live.default.set_failure(True),
        lambda: (live.default.set_failure(False), live.fallback.set_failure(True)),
        lambda: (live.default.set_delay(0), live.fallback.set_failure(False),
                 live.fallback.set_delay(200)),
        lambda: live.default.set_delay(1800),
    ]
    ids: list[str] = []
    for phase in phases:
        phase()
        ids.extend(accept_all(live, 600, concurrency=40))
        # Both instances' ledgers agree with the processors at every step, mid-fault too.
        live.wait_until_processed(len(ids), timeout_s=60)
        assert_ledgers_catch_up(live)
    summary = assert_ledgers_match_processors(live)
    assert summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"] == len(ids)
    assert summary["default"]["totalRequests"] > 0 and summary["fallback"]["totalRequests"] > 0
    # no payment sent to both processors
    assert all((live.default.held(i) is None) != (live.fallback.held(i) is None) for i in ids[::5])
