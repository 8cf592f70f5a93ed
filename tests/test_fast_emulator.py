"""The C payment-processor emulator (perf/processor.c) against the Python
emulator's own behaviour tests (tests/test_emulator.py, imported here and run
against it), and what the benchmarks lean on: many payments, exact range
summaries, and answering at once."""
from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

if shutil.which("gcc") is None:
    pytest.skip("gcc is needed to build the processor emulator", allow_module_level=True)

PERF = Path(__file__).resolve().parent.parent / "perf"
sys.path.insert(0, str(PERF))

from fast_processor import FastProcessor  # noqa: E402
from test_emulator import (  # noqa: E402,F401  (the shared tests and the fixture they use)
    TOKEN,
    call,
    emulator,
    pay,
    payment_body,
    read_responses,
    summary,
    test_admin_needs_the_current_token,
    test_admission_beyond_inflight_and_queue_is_429,
    test_admitted_payment_is_stored_when_its_client_hangs_up,
    test_amount_is_rounded_from_its_decimal_text,
    test_delay_is_honoured_and_reported,
    test_duplicate_correlation_id_is_422,
    test_failure_mode_answers_500_and_stores_nothing,
    test_health_check_answers_once_per_window_with_a_line_of_two,
    test_health_waiter_that_hangs_up_leaves_the_line,
    test_pipelined_requests_are_answered_in_order,
    test_processes_and_returns_a_payment,
    test_purge_clears_every_payment,
    test_rejects_malformed_payments,
    test_summary_amounts_are_exact_with_a_half_even_fee,
    test_summary_bounds_are_inclusive_at_millisecond_precision,
    test_unknown_paths_wrong_methods_and_oversized_bodies,
)

SEED = random.randrange(2**32)


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    built = tmp_path_factory.mktemp("processor-bin") / "processor"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(built), str(PERF / "processor.c")],
                   check=True, timeout=60)
    return built


@pytest.fixture
def start_emulator(binary) -> Iterator:
    """What tests/test_emulator.py's tests start: here the C emulator, with the same options."""
    started: list[FastProcessor] = []

    def start(*options: str) -> FastProcessor:
        processor = FastProcessor(binary, "--fee", "0.07", *options)
        started.append(processor)
        return processor

    yield start
    for processor in started:
        assert processor.stop() == 0


def test_answers_match_the_python_emulator_byte_for_byte(emulator) -> None:
    """Bodies of every kind of answer, as the reference writes them."""
    correlation_id = "3f2c4a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
    assert call(emulator, "POST", "/payments", payment_body(correlation_id.upper()))[2] == \
        b'{"message":"payment processed successfully"}'
    status, headers, body = call(emulator, "POST", "/payments", payment_body(correlation_id))
    assert (status, body) == (422, b'{"message":"Payment could not be processed. CorrelationId already exists: '
                                    + correlation_id.encode() + b'"}')
    assert headers["Content-Type"] == "application/json"
    assert call(emulator, "POST", "/payments", b'{"correlationId": 5}')[2] == \
        b'{"message":"requestedAt must be a string"}'
    assert call(emulator, "POST", "/payments", payment_body(str(uuid.uuid4()), requested_at="x'y"))[2] == \
        b'{"message":"not an ISO-8601 timestamp: \\"x\'y\\""}'
    assert call(emulator, "POST", "/payments", payment_body(str(uuid.uuid4()), requested_at="2025-02-29T00:00:00Z"))[2] \
        == b'{"message":"not a valid date-time: \'2025-02-29T00:00:00Z\'"}'
    assert call(emulator, "GET", "/payments/service-health")[2] == b'{"failing":false,"minResponseTime":0}'
    assert call(emulator, "PUT", "/admin/configurations/delay", {"delay": 1.5}, TOKEN)[2] == \
        b'{"message":"delay must be a int"}'
    assert call(emulator, "PUT", "/admin/configurations/failure", {"failure": 1}, TOKEN)[2] == \
        b'{"message":"failure must be a boolean"}'


def test_requested_at_is_kept_as_sent(emulator) -> None:
    sent = {"2025-07-15T12:34:56.789Z": "2025-07-15T12:34:56.789Z",
            "2025-07-15T09:34:56.789123-03:00": "2025-07-15T09:34:56.789123-03:00",
            "2025-07-15T12:34:56": "2025-07-15T12:34:56"}
    for requested_at, kept in sent.items():
        correlation_id = str(uuid.uuid4())
        assert pay(emulator, correlation_id, requested_at=requested_at) == 200
        assert json.loads(call(emulator, "GET", f"/payments/{correlation_id}")[2])["requestedAt"] == kept
    # one instant, three spellings
    assert summary(emulator, "?from=2025-07-15T12:34:56.789Z&to=2025-07-15T12:34:56.789Z")["totalRequests"] == 1
    assert summary(emulator, "?from=2025-07-15T12:34:56.789123Z&to=2025-07-15T12:34:56.789123Z")["totalRequests"] == 1


def test_json_edges_are_read_as_python_reads_them(emulator) -> None:
    correlation_id = str(uuid.uuid4())
    escaped = correlation_id.replace("-", "\\u002d")
    body = (b'{"correlationId": "%s", "amount": 20.05, "amount": 3, "requestedAt": "2025-07-15T12:00:00.000Z",'
            b' "extra": [1, {"x": null}, "\\u00e9"]}' % escaped.encode())
    assert call(emulator, "POST", "/payments", body)[0] == 200
    assert json.loads(call(emulator, "GET", f"/payments/{correlation_id}")[2])["amount"] == 3.0
    for bad in (b'{"correlationId": "%s", "amount": 1, "requestedAt": "2025-07-15T12:00:00Z"} x',
                b'{"correlationId": "%s", "amount": 01, "requestedAt": "2025-07-15T12:00:00Z"}',
                b'{"correlationId": "%s", "amount": 1, "requestedAt": "2025-07-15T12:00:00Z", "x": NaN}',
                b'{"correlationId": "%s", "amount": 1, "requestedAt": "2025-07-15T12:00:00Z", "x": "\xff"}',
                b'{"correlationId": "%s", "amount": 1, "requestedAt": "2025-07-15T12:00:00Z",}'):
        assert call(emulator, "POST", "/payments", bad % str(uuid.uuid4()).encode())[0] == 400, bad
    assert summary(emulator)["totalRequests"] == 1


def test_range_summaries_are_exact_over_payments_out_of_order(emulator) -> None:
    """Payments arrive slightly out of requestedAt order, as from two senders, in
    batches with summaries between them (late ones are merged in then); every
    range is checked against a plain sum of what was sent."""
    generator = random.Random(SEED)
    start = datetime(2025, 7, 15, 12, tzinfo=timezone.utc)
    sent: list[tuple[datetime, int]] = []

    def iso(moment: datetime) -> str:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    def check(first: datetime | None, last: datetime) -> None:
        expected = [cents for at, cents in sent if (first is None or first <= at) and at <= last]
        query = f"?to={iso(last)}" + (f"&from={iso(first)}" if first else "")
        got = summary(emulator, query)
        assert (got["totalRequests"], round(got["totalAmount"] * 100)) == (len(expected), sum(expected)), \
            (query, SEED)

    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as connection:
        for batch in range(5):
            requests = []
            for number in range(batch * 1_000, (batch + 1) * 1_000):
                at = start + timedelta(milliseconds=number * 3 + generator.choice((0, 0, -40, 2)))
                cents = generator.randint(1, 100_000)
                sent.append((at, cents))
                body = payment_body(str(uuid.uuid4()), f"{cents // 100}.{cents % 100:02d}", iso(at))
                requests.append(b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
            connection.sendall(b"".join(requests))
            assert {status for status, _ in read_responses(connection, len(requests))} == {200}
            # where this batch met the one before, and its own end
            for at, _ in sent[max(0, batch * 1_000 - 30):batch * 1_000 + 30] + sent[-30:]:
                check(None, at)
    for _ in range(40):
        first, last = sorted(generator.choice(sent)[0] for _ in range(2))
        check(first, last)
    total = summary(emulator)
    assert (total["totalRequests"], round(total["totalAmount"] * 100)) == (len(sent), sum(c for _, c in sent))


def test_health_limit_can_be_lifted(start_emulator) -> None:
    processor = start_emulator("--health-interval", "0")
    assert [call(processor, "GET", "/payments/service-health")[0] for _ in range(5)] == [200] * 5


def test_bad_options_exit_2(binary) -> None:
    for options in (["--fee", "x"], ["--port", "70000"], ["--max-inflight", "0"], ["--bogus"]):
        completed = subprocess.run([str(binary), *options], capture_output=True, text=True, timeout=5)
        assert completed.returncode == 2 and completed.stderr, options


def test_exits_cleanly_on_sigterm(binary) -> None:
    processor = FastProcessor(binary)
    processor.process.send_signal(signal.SIGTERM)
    assert processor.process.wait(timeout=5) == 0
    processor.stop()
