"""Flow control (service/flow_control.py): what a client that pipelines without
reading can make an instance hold is bounded, and others are served meanwhile."""
from __future__ import annotations

import asyncio
import select
import socket
import time
import uuid

import pytest
from conftest import call, quick_stack
from test_service import payment

from paycore.service import responses
from paycore.service.connections import ConnectionGuard, ConnectionLimits
from paycore.service.flow_control import FEED_BYTES, HIGH_WATER_BYTES, LOW_WATER_BYTES, MAX_OWED_ANSWERS
from paycore.service.http_server import HttpProtocol
from paycore.service.metrics import Metrics

SUMMARY_REQUEST = b"GET /payments-summary HTTP/1.1\r\nHost: paycore\r\n\r\n"
LIMITS = ConnectionLimits(max_connections=8, max_head_bytes=8192, max_body_bytes=16384,
                          request_timeout_ms=1000, idle_timeout_ms=60000)
TIMEOUT_SWEEPS = 4


class SlowReaderTransport(asyncio.Transport):
    """A socket whose client reads nothing until told: writes pile up in the
    buffer, and the protocol hears of the high- and low-water marks as from a
    real transport."""

    def __init__(self, protocol: HttpProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered: list[bytes] = []
        self.delivered = b""
        self.reading = True
        self.closing = self.aborted = False
        self.high = self.low = 0
        self.writing_paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high, self.low = high, low

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.buffered))

    def write(self, data: bytes) -> None:
        self.buffered.append(data)
        if not self.writing_paused and self.get_write_buffer_size() > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def client_reads(self) -> None:
        self.delivered += b"".join(self.buffered)
        self.buffered.clear()
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


class Answers:
    """Answers every request with a fixed answer, or with a future left pending."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self.handled = 0
        self.pending: list[asyncio.Future] = []

    def handle(self, method: bytes, url: bytes, body: bytes, authorization: bytes):
        self.handled += 1
        if not self.deferred:
            return responses.NOT_FOUND
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future


class AtOnce:
    promised = 0

    def after_durable(self, promise, callback, *args) -> None:
        callback(*args)

    def flush_waiting(self) -> None:
        pass


def connect(answers: Answers) -> tuple[HttpProtocol, SlowReaderTransport]:
    protocol = HttpProtocol(answers, AtOnce(), ConnectionGuard(LIMITS), Metrics())
    transport = SlowReaderTransport(protocol)
    protocol.connection_made(transport)
    return protocol, transport


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_client_that_reads_nothing_stops_being_read_and_is_served_in_order_once_it_reads():
    async def scenario() -> None:
        answers = Answers()
        protocol, transport = connect(answers)
        assert (transport.high, transport.low) == (HIGH_WATER_BYTES, LOW_WATER_BYTES)
        pipelined = 100_000
        protocol.data_received(SUMMARY_REQUEST * pipelined)  # one huge read
        assert not transport.reading
        await turns(1000)
        # Parsed a slice per turn until the unsent answers passed the high-water
        # mark; then nothing more, however many turns go by.
        taken = answers.handled
        assert taken < pipelined
        assert HIGH_WATER_BYTES < transport.get_write_buffer_size() < HIGH_WATER_BYTES + 2 * FEED_BYTES * 4
        await turns(100)
        assert answers.handled == taken and not transport.reading
        # The client reads: parsing goes on from where it stopped, answers in order.
        for _ in range(100_000):
            if answers.handled == pipelined and transport.reading:
                break
            transport.client_reads()
            await asyncio.sleep(0)
        transport.client_reads()
        assert answers.handled == pipelined and transport.reading
        assert transport.delivered == responses.NOT_FOUND * pipelined
    asyncio.run(scenario())


def test_answers_owed_are_bounded():
    """A store that has not answered yet: past MAX_OWED_ANSWERS owed, reading
    pauses until answers leave."""
    async def scenario() -> None:
        answers = Answers(deferred=True)
        protocol, transport = connect(answers)
        for _ in range(4 * MAX_OWED_ANSWERS):
            if transport.reading:
                protocol.data_received(SUMMARY_REQUEST)
        assert answers.handled == MAX_OWED_ANSWERS and not transport.reading
        for future in answers.pending:
            future.set_result(responses.ACCEPTED)
        await turns(2)
        assert transport.reading
        transport.client_reads()
        assert transport.delivered == responses.ACCEPTED * MAX_OWED_ANSWERS
    asyncio.run(scenario())


def test_a_connection_whose_answers_stay_unsent_is_dropped():
    async def scenario() -> None:
        protocol, transport = connect(Answers())
        protocol.data_received(SUMMARY_REQUEST * 2000)
        await turns(200)
        for _ in range(TIMEOUT_SWEEPS):
            protocol.sweep(TIMEOUT_SWEEPS, 1000)
        assert not transport.aborted
        protocol.sweep(TIMEOUT_SWEEPS, 1000)
        assert transport.aborted
        # A client that takes its answers is not.
        protocol, transport = connect(Answers())
        protocol.data_received(SUMMARY_REQUEST * 2000)
        for _ in range(2 * TIMEOUT_SWEEPS):
            await turns(20)
            transport.client_reads()
            protocol.sweep(TIMEOUT_SWEEPS, 1000)
        assert not transport.aborted
    asyncio.run(scenario())


def test_a_large_read_is_parsed_one_slice_per_turn():
    """Two connections, one with a pile of requests: the other's request is
    answered in the next turn, not after the whole pile."""
    async def scenario() -> None:
        busy_answers, quick_answers = Answers(), Answers()
        busy, busy_transport = connect(busy_answers)
        quick, quick_transport = connect(quick_answers)
        busy.data_received(SUMMARY_REQUEST * 10_000)
        quick.data_received(SUMMARY_REQUEST)
        assert quick_answers.handled == 1
        await turns(1)
        assert busy_answers.handled <= FEED_BYTES // len(SUMMARY_REQUEST) + 1
    asyncio.run(scenario())


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


PIPELINED = 1_000_000
PIPELINE_SECONDS = 3.0


@pytest.fixture(scope="module")
def stack():
    with quick_stack() as live:
        yield live


def test_one_client_pipelining_a_million_requests_without_reading(stack):
    live = stack
    pids = {index: process.pid for index, process in live.stack.instances.items()}
    idle = {index: rss_mb(pid) for index, pid in pids.items()}
    pipeline = socket.create_connection(("127.0.0.1", live.port))
    pipeline.setblocking(False)
    requests = memoryview(SUMMARY_REQUEST * PIPELINED)
    sent = 0
    served = []
    started = time.monotonic()
    while time.monotonic() - started < PIPELINE_SECONDS and sent < len(requests):
        if select.select([], [pipeline], [], 0.05)[1]:
            try:
                sent += pipeline.send(requests[sent:sent + 1 << 20])
            except BlockingIOError:
                pass
        # Meanwhile both instances serve others.
        for index in pids:
            asked = time.monotonic()
            assert call(live.instance(index), "POST", "/payments", payment(str(uuid.uuid4())))[0] == 202
            served.append(time.monotonic() - asked)
    grown = {index: rss_mb(pid) - idle[index] for index, pid in pids.items()}
    pipeline.close()
    print(f"\npipelining client: {sent // len(SUMMARY_REQUEST):,} of {PIPELINED:,} requests taken in "
          f"{PIPELINE_SECONDS} s; RSS growth MB {grown}; others served: {len(served)}, "
          f"slowest {max(served) * 1000:.1f} ms")
    assert sent < len(requests), "the instance read every request of a client that reads nothing"
    assert all(growth < 10 for growth in grown.values()), grown
    assert len(served) >= 20 and max(served) < 1.0
