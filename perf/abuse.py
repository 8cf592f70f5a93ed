"""Hostile clients against a running service, and normal payments timed beside them.

- pipelining: connections that send `GET /payments-summary` as fast as the
  server takes it and never read an answer; one the server drops is opened again;
- slowloris: connections that send a request head one byte at a time, every
  100 ms; one cut off (408) is opened again;
- payments: virtual users, each on its own keep-alive connection, posting a
  fresh payment at a steady pace; a payment fails if it gets no 2xx within
  1.5 s (SPEC §1: clients give up then).

The hostile clients run in a process of their own (`run_hostile`), so their
work does not delay the timing of the payments.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cgroups import CgroupJail, compose_limits

from paycore.stack import Stack, StackSettings

REPO = Path(__file__).resolve().parents[1]

PIPELINED_REQUEST = b"GET /payments-summary HTTP/1.1\r\nHost: paycore\r\n\r\n"
PIPELINED_CHUNK = PIPELINED_REQUEST * 4096
SLOWLORIS_HEAD = (b"POST /payments HTTP/1.1\r\nHost: paycore\r\nContent-Type: application/json\r\n"
                  b"X-Padding: " + b"a" * 4000 + b"\r\n")
SLOWLORIS_BYTE_INTERVAL_S = 0.1
PAYMENT_TIMEOUT_S = 1.5
RECONNECT_PAUSE_S = 0.05


@dataclass
class HostileCounts:
    connections: int = 0        # opened, reopened ones included
    pipelined_bytes: int = 0    # taken by the server (its socket buffers included)


async def _reconnecting(port: int, deadline: float, counts: HostileCounts, behave) -> None:
    """Open a connection and behave(connection, deadline, counts) on it until the
    deadline; one the server drops is opened again."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            connection = socket.create_connection(("127.0.0.1", port))
        except OSError:
            await asyncio.sleep(RECONNECT_PAUSE_S)
            continue
        counts.connections += 1
        connection.setblocking(False)
        try:
            await behave(connection, deadline, counts)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            connection.close()
        await asyncio.sleep(RECONNECT_PAUSE_S)


async def _pipeline(connection: socket.socket, deadline: float, counts: HostileCounts) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        await asyncio.wait_for(loop.sock_sendall(connection, PIPELINED_CHUNK), max(0.01, deadline - loop.time()))
        counts.pipelined_bytes += len(PIPELINED_CHUNK)


async def _slowloris(connection: socket.socket, deadline: float, counts: HostileCounts) -> None:
    loop = asyncio.get_running_loop()
    for byte in SLOWLORIS_HEAD:
        if loop.time() >= deadline:
            return
        await loop.sock_sendall(connection, bytes([byte]))
        await asyncio.sleep(SLOWLORIS_BYTE_INTERVAL_S)


async def _hostile(port: int, pipelining: int, slowloris: int, seconds: float) -> HostileCounts:
    counts = HostileCounts()
    deadline = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(_reconnecting(port, deadline, counts, _pipeline) for _ in range(pipelining)),
                         *(_reconnecting(port, deadline, counts, _slowloris) for _ in range(slowloris)))
    return counts


def _hostile_process(port: int, pipelining: int, slowloris: int, seconds: float,
                     results: multiprocessing.Queue) -> None:
    results.put(asyncio.run(_hostile(port, pipelining, slowloris, seconds)))


def run_hostile(port: int, pipelining: int, slowloris: int, seconds: float):
    """Start the hostile clients in their own process for `seconds`; returns a
    function that waits for them and gives their HostileCounts."""
    results: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(
        target=_hostile_process, args=(port, pipelining, slowloris, seconds, results), daemon=True)
    process.start()

    def finish() -> HostileCounts:
        counts = results.get(timeout=seconds + 30)
        process.join(10)
        return counts
    return finish


@dataclass
class PaymentTimes:
    latencies_s: list[float]
    failures: list[str]

    def percentile_ms(self, percent: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, math.ceil(percent / 100 * len(ordered)) - 1)] * 1000


async def _user(port: int, interval_s: float, deadline: float, times: PaymentTimes) -> None:
    loop = asyncio.get_running_loop()
    reader = writer = None
    next_at = loop.time()
    while next_at < deadline:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        next_at += interval_s
        body = b'{"correlationId":"%s","amount":20.05}' % str(uuid.uuid4()).encode()
        request = (b"POST /payments HTTP/1.1\r\nHost: paycore\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), PAYMENT_TIMEOUT_S)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PAYMENT_TIMEOUT_S)
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), PAYMENT_TIMEOUT_S)
            status = int(head.split(b" ", 2)[1])
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, StopIteration) as error:
            times.failures.append(repr(error))
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        if 200 <= status < 300:
            times.latencies_s.append(time.perf_counter() - started)
        else:
            times.failures.append(f"status {status}")
        if b"connection: close" in head.lower():
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def time_payments(port: int, users: int, per_user_per_s: float, seconds: float) -> PaymentTimes:
    """Each user posts per_user_per_s payments a second for seconds, started evenly spread."""
    times = PaymentTimes([], [])
    loop = asyncio.get_running_loop()
    interval = 1 / per_user_per_s
    deadline = loop.time() + seconds

    async def staggered(index: int) -> None:
        await asyncio.sleep(interval * index / users)
        await _user(port, interval, deadline, times)
    await asyncio.gather(*(staggered(index) for index in range(users)))
    return times


@contextlib.contextmanager
def production_stack(jail_prefix: str) -> Iterator[tuple[Stack, dict[str, int]]]:
    """The load balancer and two instances with their production settings, each
    held (where cgroups v1 are writable) to docker-compose.yml's limits; emulated
    processors outside them. Yields the stack and each service's memory limit."""
    limits = compose_limits(REPO / "docker-compose.yml")
    jail = CgroupJail(limits, jail_prefix) if CgroupJail.available() else None
    if jail is None:
        print("warning: cgroups not writable; the stack runs without its limits", file=sys.stderr)
    settings = StackSettings(port=0, default_port=0, fallback_port=0,
                             quiet=True, cgroups=jail.directories if jail else {},
                             instance_env={"PAYCORE_LOG_LEVEL": "WARNING"})
    try:
        with Stack(settings) as stack:
            yield stack, {limit.service: limit.memory_bytes for limit in limits}
    finally:
        if jail:
            jail.close()


@dataclass
class AbuseRound:
    quiet: PaymentTimes        # payments alone
    abused: PaymentTimes       # the same payments beside the hostile clients
    hostile: HostileCounts
    peak_rss_mb: dict[str, float]   # compose service -> its process's peak RSS (if it still runs)
    ended: list[str]                # services whose process is not running at the end (OOM-killed)


def abuse_round(stack: Stack, *, quiet_s: float, abuse_s: float, users: int, per_user_per_s: float,
                pipelining: int, slowloris: int) -> AbuseRound:
    """Payments alone for quiet_s, then for abuse_s beside the hostile clients
    (started a second before them, so every connection is in place)."""
    quiet = asyncio.run(time_payments(stack.port, users, per_user_per_s, quiet_s))
    finish = run_hostile(stack.port, pipelining, slowloris, abuse_s + 1)
    time.sleep(1)
    abused = asyncio.run(time_payments(stack.port, users, per_user_per_s, abuse_s))
    hostile = finish()
    processes = {"load-balancer": stack.balancer, **{f"api{i}": p for i, p in stack.instances.items()}}
    ended = [name for name, process in processes.items() if process.poll() is not None]
    return AbuseRound(quiet, abused, hostile,
                      {name: peak_rss_mb(process.pid) for name, process in processes.items() if name not in ended},
                      ended)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for {pid}")
