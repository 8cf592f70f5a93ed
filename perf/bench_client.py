"""The outbound processor client against aiohttp, side by side, on one emulator.

Each round sends the same number of payments with the same concurrency through
each client in turn and measures the client process's CPU time per payment and
the median request latency. Run: .venv/bin/python perf/bench_client.py
(CLIENT_PAYMENTS per round, default 4,000; CLIENT_ROUNDS, default 5)
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid

import aiohttp
import uvloop

from paycore.core.processor_payload import encode_payment
from paycore.emulator import EmulatorProcess
from paycore.service.processor_client import Outcome, ProcessorClient

PAYMENTS = int(os.environ.get("CLIENT_PAYMENTS", "4000"))
CONCURRENCY = 64
ROUNDS = int(os.environ.get("CLIENT_ROUNDS", "5"))


async def drive(send, count: int) -> list[float]:
    latencies: list[float] = []
    next_index = iter(range(count))

    async def worker() -> None:
        for _ in next_index:
            started = time.perf_counter()
            await send(uuid.uuid4().bytes, 2005, time.time_ns() // 1_000_000)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return latencies


async def with_paycore(url: str) -> list[float]:
    client = ProcessorClient("default", url, timeout_ms=5000)

    async def send(uuid16: bytes, cents: int, requested_at_ms: int) -> None:
        assert await client.send_payment(uuid16, cents, requested_at_ms) is Outcome.PROCESSED

    try:
        return await drive(send, PAYMENTS)
    finally:
        client.close()


async def with_aiohttp(url: str) -> list[float]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        async def send(uuid16: bytes, cents: int, requested_at_ms: int) -> None:
            async with session.post("/payments", data=encode_payment(uuid16, cents, requested_at_ms),
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                assert response.status == 200

        return await drive(send, PAYMENTS)


def measure(client, url: str) -> tuple[float, float]:
    cpu_before = time.process_time()
    latencies = uvloop.run(client(url))
    cpu_us = (time.process_time() - cpu_before) / PAYMENTS * 1e6
    return cpu_us, statistics.median(latencies) * 1e3


def main() -> None:
    results: dict[str, list[tuple[float, float]]] = {"paycore client": [], "aiohttp": []}
    with EmulatorProcess("--fee", "0.07") as emulator:
        for _ in range(ROUNDS):
            results["paycore client"].append(measure(with_paycore, emulator.url))
            results["aiohttp"].append(measure(with_aiohttp, emulator.url))
    medians = {name: (statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds))
               for name, rounds in results.items()}
    for name, (cpu_us, latency_ms) in medians.items():
        print(f"{name:>15}: {cpu_us:6.1f} us client CPU per payment, median latency {latency_ms:.2f} ms")
    ratio = medians["aiohttp"][0] / medians["paycore client"][0]
    print(f"{'ratio':>15}: aiohttp spends {ratio:.2f}x the CPU per payment "
          f"({PAYMENTS} payments x {ROUNDS} rounds, concurrency {CONCURRENCY})")


if __name__ == "__main__":
    main()
