#!/usr/bin/env python3
"""Fuzz target: HttpProtocol, the HTTP/1.1 layer, fed any bytes cut into any chunks.

An input is a header and the byte stream the client sends:
  byte 0   the stream is cut into 1 + (byte 0 & 7) chunks; bit 7: the client
           hangs up before the last journal batch is written
  byte 1   bit i: another connection's promise is pending while chunk i is
           read, and writing it fails, so the answers wait for it
  byte 2   bit i: the connection guard's timer sweeps before chunk i is read
  then     one byte per cut: the length of the chunk before it
  the rest the stream

What must hold: nothing escapes data_received; every write is one or more
complete HTTP/1.1 responses with Content-Length matching the body (none for
an interim 1xx); nothing is written once the transport is closing; an answer
after which the server closes says `Connection: close`; the handler never gets
a body or a URL over the limits; while the connection stays open every
handled request is answered. Input is parsed a few bytes per turn of the loop
(FEED_BYTES made small), and a chunk is delivered only while the protocol
reads, as a transport does.
"""
from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from typing import Any

import atheris
from paycore.service import responses

with atheris.instrument_imports(include=["paycore.service"]):
    from paycore.service import http_server
    from paycore.service.connections import ConnectionGuard, ConnectionLimits
    from paycore.service.http_server import HttpProtocol
    from paycore.service.metrics import Metrics

# Inputs are short: a small slice makes them cross slice boundaries.
http_server.FEED_BYTES = 24
# Turns of the loop a chunk may wait for the protocol to read again.
MAX_TURNS = 512

# Small, so that the fuzzer reaches them easily.
LIMITS = ConnectionLimits(max_connections=1, max_head_bytes=256, max_body_bytes=64,
                          request_timeout_ms=1000, idle_timeout_ms=1000)
# A request (or an idle connection) times out at its second sweep.
TIMEOUT_SWEEPS = 1
HEADER_SIZE = 3
HANDLED_STATUS = 202
HANDLED = responses.http_response(HANDLED_STATUS, b'{"handled":true}')
RESPONSE_HEAD = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]+\r\n(?:[!#-'*+.0-9A-Z^-z|~-]+: [^\r\n]*\r\n)*\r\n")
CONTENT_LENGTH = re.compile(rb"(?im)^content-length: ([0-9]+)\r$")
CONNECTION_CLOSE = re.compile(rb"(?im)^connection: close\r$")


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False
        self.reading = True
        # The write since the last sweep began: an answer the server closes right after.
        self.last_write: bytes | None = None

    def write(self, data: bytes) -> None:
        assert not self.closing, f"written after close: {data!r}"
        assert type(data) is bytes, type(data)
        self.writes.append(data)
        self.last_write = data

    def close(self) -> None:
        if self.last_write is not None and not self.closing:
            last_head = self.last_write[self.last_write.rfind(b"HTTP/1.1 "):]
            assert CONNECTION_CLOSE.search(last_head.partition(b"\r\n\r\n")[0]), \
                f"closed after an answer without Connection: close: {self.last_write!r}"
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing


class RecordingRoutes:
    """Answers every request at once; while `promising`, each answer promises
    a payment the journal must hold first."""

    def __init__(self, journal: BatchingJournal) -> None:
        self.calls = 0
        self.promising = False
        self._journal = journal

    def handle(self, method: bytes, url: bytes, body: bytes, authorization: bytes) -> bytes:
        assert len(body) <= LIMITS.max_body_bytes, f"handler got a body of {len(body)} bytes"
        assert len(url) <= LIMITS.max_head_bytes, f"handler got a URL of {len(url)} bytes"
        self.calls += 1
        if self.promising:
            self._journal.promise()
        return HANDLED


class BatchingJournal:
    """JournalWriter's contract: a callback waits, in order, until the batch
    holding its promise is written; flush() writes the open batch unless the
    write fails (`failing`)."""

    def __init__(self) -> None:
        self.failing = False
        self.promised = 0
        self._durable = 0
        self._waiting: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def promise(self) -> None:
        self.promised += 1

    def after_durable(self, promise: int, callback: Callable[..., Any], *args: Any) -> None:
        if promise <= self._durable and not self._waiting:
            callback(*args)
        else:
            self._waiting.append((callback, args))

    def flush(self) -> None:
        if self.failing:
            return
        self._durable = self.promised
        waiting, self._waiting = self._waiting, []
        for callback, args in waiting:
            callback(*args)

    def flush_waiting(self) -> None:
        if self.promised > self._durable:
            self.flush()


def make_protocol(routes: RecordingRoutes, journal: BatchingJournal) -> HttpProtocol:
    return HttpProtocol(routes, journal, ConnectionGuard(LIMITS), Metrics())


LOOP = asyncio.new_event_loop()


def test_one_input(data: bytes) -> None:
    LOOP.run_until_complete(exchange(data))


async def turns_until_reading(transport: RecordingTransport) -> None:
    for _ in range(MAX_TURNS):
        if transport.reading or transport.closing:
            return
        await asyncio.sleep(0)


async def exchange(data: bytes) -> None:
    chunks, journal_writing, sweeps, hang_up_early = split_input(data)
    journal, transport = BatchingJournal(), RecordingTransport()
    routes = RecordingRoutes(journal)
    protocol = make_protocol(routes, journal)
    protocol.connection_made(transport)
    for chunk, writing, sweep in zip(chunks, journal_writing, sweeps):
        if sweep:
            transport.last_write = None
            protocol.sweep(TIMEOUT_SWEEPS, TIMEOUT_SWEEPS)
        await turns_until_reading(transport)
        if transport.closing:
            break  # a closing transport reads no more
        # The requests of this read promise payments, and their batch's write fails.
        routes.promising = writing
        journal.failing = writing
        if chunk and transport.reading:  # asyncio never delivers an empty read
            protocol.data_received(chunk)
    if not hang_up_early:
        journal.failing = False
        journal.flush()
        await turns_until_reading(transport)
        journal.flush()
    closed_by_server = transport.closing
    transport.last_write = None  # what follows is the client's hang-up
    if not transport.closing and not protocol.eof_received():
        transport.close()
    protocol.connection_lost(None)
    journal.failing = False
    journal.flush()

    statuses = [status for written in transport.writes for status in response_statuses(written)]
    handled_answers = statuses.count(HANDLED_STATUS)
    assert handled_answers <= routes.calls, f"{handled_answers} answers to {routes.calls} requests"
    if not closed_by_server and not hang_up_early:
        assert handled_answers == routes.calls, f"{routes.calls} requests, {handled_answers} answered"


def split_input(data: bytes) -> tuple[list[bytes], list[bool], list[bool], bool]:
    """The chunks; for each, whether a journal batch is being written and whether
    the guard sweeps before it; whether the client hangs up early."""
    header = data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0")
    cut_count = header[0] & 7
    stream = data[HEADER_SIZE + cut_count:]
    chunks = []
    for length in data[HEADER_SIZE:HEADER_SIZE + cut_count]:
        chunks.append(stream[:length])
        stream = stream[length:]
    chunks.append(stream)
    journal_writing, sweeps = ([bool(flags >> index & 1) for index in range(len(chunks))]
                               for flags in header[1:3])
    return chunks, journal_writing, sweeps, bool(header[0] & 0x80)


def response_statuses(written: bytes) -> list[int]:
    """The status of each complete response that written is made of, exactly."""
    statuses = []
    at = 0
    while at < len(written):
        head = RESPONSE_HEAD.match(written, at)
        assert head, f"no HTTP/1.1 response head at byte {at}: {written[at:at + 80]!r}"
        lengths = CONTENT_LENGTH.findall(head[0])
        if head[1].startswith(b"1"):
            assert not lengths, f"an interim answer with a body: {head[0]!r}"
            at = head.end()
            continue
        assert len(lengths) == 1, f"{len(lengths)} Content-Length headers in {head[0]!r}"
        at = head.end() + int(lengths[0])
        assert at <= len(written), f"body shorter than its Content-Length in {written!r}"
        statuses.append(int(head[1]))
    return statuses


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
