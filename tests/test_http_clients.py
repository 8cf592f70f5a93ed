"""Real HTTP client libraries on pooled keep-alive connections, through the load
balancer: every bad request of the service's tables (malformed and oversized
bodies, unknown paths, wrong methods, an oversized head, malformed HTTP where
the library will send it, a purge without the admin token) between good
payments on the same pool. Every good payment must succeed at its first try:
after each answer the server hangs up on, the answer said so and the library
opened a new connection instead of reusing a dead one."""
from __future__ import annotations

import asyncio
import subprocess
import uuid
from dataclasses import dataclass, field

import aiohttp
import httpx
import pytest
import requests
from test_service import MALFORMED, WRONG_ROUTES, ZERO, as_summary, payment

TIMEOUT_S = 10


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    body: bytes | None
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    # The server hangs up after the answer: its connection may not be reused.
    closes: bool = False


GOOD = 202
JSON = {"Content-Type": "application/json"}
BAD = [
    *(Exchange("POST", "/payments", body, status, JSON, closes=status == 413) for body, status in MALFORMED),
    *(Exchange(method, path, b"{}" if method != "GET" else None, status) for method, path, status in WRONG_ROUTES),
    Exchange("POST", "/payments", payment(), 431, {**JSON, "X-Padding": "a" * 9000}, closes=True),
    Exchange("POST", "/purge-payments", None, 403),
    Exchange("POST", "/purge-payments", None, 403, {"Authorization": "Bearer not-the-token"}),
]
# A control character in a header value is malformed HTTP (400); aiohttp refuses to send it.
MALFORMED_HTTP = Exchange("GET", "/payments-summary", None, 400, {"X-Bad": "a\x01b"}, closes=True)


def interleaved(bad: list[Exchange]) -> list[Exchange]:
    """A good payment before and after every bad request."""
    good = [Exchange("POST", "/payments", payment(str(uuid.uuid4())), GOOD, JSON) for _ in range(len(bad) + 1)]
    sequence = [good[0]]
    for bad_one, good_one in zip(bad, good[1:]):
        sequence += [bad_one, good_one]
    return sequence


def assert_statuses(sequence: list[Exchange], statuses: list[int]) -> None:
    mismatched = [(exchange.method, exchange.path, (exchange.body or b"")[:60], exchange.status, status)
                  for exchange, status in zip(sequence, statuses) if status != exchange.status]
    assert len(statuses) == len(sequence) and not mismatched, mismatched


def assert_only_good_payments_counted(live, sequence: list[Exchange]) -> None:
    good = sum(1 for exchange in sequence if exchange.status == GOOD)
    processed = live.wait_until_processed(good)
    assert processed["default"]["totalRequests"] + processed["fallback"]["totalRequests"] == good
    assert live.summaries() == [as_summary(processed)] * 2


def test_aiohttp_client_session(live):
    sequence = interleaved(BAD)

    async def run() -> list[int]:
        statuses = []
        connector = aiohttp.TCPConnector(limit=1)  # one pooled connection, reused whenever it may be
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{live.port}", connector=connector,
                                         timeout=timeout) as session:
            for exchange in sequence:
                async with session.request(exchange.method, exchange.path, data=exchange.body,
                                           headers=exchange.headers) as response:
                    await response.read()
                    statuses.append(response.status)
        return statuses

    assert_statuses(sequence, asyncio.run(run()))
    assert_only_good_payments_counted(live, sequence)


def test_requests_session(live):
    sequence = interleaved([*BAD, MALFORMED_HTTP])
    with requests.Session() as session:
        # No retries (urllib3's default here): a dead connection would fail the request.
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0))
        statuses = [session.request(exchange.method, f"http://127.0.0.1:{live.port}{exchange.path}",
                                    data=exchange.body, headers=exchange.headers, timeout=TIMEOUT_S).status_code
                    for exchange in sequence]
    assert_statuses(sequence, statuses)
    assert_only_good_payments_counted(live, sequence)


def test_httpx_client(live):
    sequence = interleaved([*BAD, MALFORMED_HTTP])
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", limits=limits, timeout=TIMEOUT_S,
                      transport=httpx.HTTPTransport(retries=0, limits=limits)) as client:
        statuses = [client.request(exchange.method, exchange.path, content=exchange.body,
                                   headers=exchange.headers).status_code
                    for exchange in sequence]
    assert_statuses(sequence, statuses)
    assert_only_good_payments_counted(live, sequence)


def test_curl_reusing_one_connection(live, tmp_path):
    """One curl process for the whole sequence (--next): it keeps its connection
    for the next transfer unless the answer said Connection: close."""
    sequence = interleaved([*BAD, MALFORMED_HTTP])
    command = ["curl", "--silent", "--show-error", "--max-time", str(TIMEOUT_S)]
    for index, exchange in enumerate(sequence):
        if index:
            command.append("--next")
        command += ["--request", exchange.method, "--write-out", "%{http_code} %{num_connects}\\n",
                    "--output", "/dev/null"]
        for name, value in exchange.headers.items():
            command += ["--header", f"{name}: {value}"]
        if exchange.body is not None:
            body_file = tmp_path / f"body-{index}"
            body_file.write_bytes(exchange.body)
            command += ["--data-binary", f"@{body_file}"]
        command.append(f"http://127.0.0.1:{live.port}{exchange.path}")
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # curl retries a request once on a fresh connection when a reused one turns out dead.
    assert "retry" not in run.stderr.lower() and "died" not in run.stderr.lower(), run.stderr
    results = [line.split() for line in run.stdout.splitlines()]
    assert_statuses(sequence, [int(status) for status, _ in results])
    # A new connection only for the first transfer and after each answer that closed one.
    expected_connects = [1] + [1 if previous.closes else 0 for previous in sequence[:-1]]
    assert [int(connects) for _, connects in results] == expected_connects
    assert_only_good_payments_counted(live, sequence)


def test_nothing_bad_was_counted(live):
    """The bad requests alone change nothing."""
    sequence = [*BAD, MALFORMED_HTTP]
    with requests.Session() as session:
        for exchange in sequence:
            session.request(exchange.method, f"http://127.0.0.1:{live.port}{exchange.path}",
                            data=exchange.body, headers=exchange.headers, timeout=TIMEOUT_S)
    assert live.summaries() == [ZERO, ZERO]
    assert as_summary(live.processors_summary()) == ZERO


@pytest.mark.parametrize("announced", [20, 17 * 1024])
def test_curl_expecting_100_continue(live, tmp_path, announced):
    """curl asks before sending a body: 100 Continue for one the service may
    take, an immediate 413 (and no body sent) for one it would refuse."""
    body = payment() if announced == 20 else b" " * announced
    body_file = tmp_path / "body"
    body_file.write_bytes(body)
    run = subprocess.run(
        ["curl", "--silent", "--show-error", "--verbose", "--max-time", str(TIMEOUT_S),
         "--header", "Expect: 100-continue", "--header", "Content-Type: application/json",
         "--data-binary", f"@{body_file}", "--write-out", "%{http_code}",
         "--output", "/dev/null", f"http://127.0.0.1:{live.port}/payments"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    if announced == 20:
        assert run.stdout == "202" and "< HTTP/1.1 100 Continue" in run.stderr, run.stderr
    else:
        assert run.stdout == "413" and "< Connection: close" in run.stderr, run.stderr
        assert "100 Continue" not in run.stderr and "upload completely sent" not in run.stderr, run.stderr
