"""The Redis store (service/store/redis_store.py): the memory Redis holds per
settled payment, and what a summary costs as the history grows.

1. Memory: a scratch redis-server (nothing persisted), one store; PAYMENTS
   payments accepted and settled through the store at ~600 payments/s of
   requestedAt; Redis's used_memory before and after, per payment, with the
   paid record's and the ledger's shares (MEMORY USAGE); once keeping
   everything and once with a 30-day retention.
2. Summaries: HISTORY_DAYS days of history before those (HISTORY payments
   spread over them); the median time of a summary, through the store,
   over the last hour, the last day, the last 30 days, from the start of
   time and unbounded; and the HMGETs each one runs in Redis.

Run: .venv/bin/python perf/bench_redis_store.py [--payments N] [--history N]
"""
from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

from paycore.core.ring_queue import RingQueue
from paycore.redis_server import RedisServer
from paycore.service.config import Settings
from paycore.service.payment import Attempt, Payment
from paycore.service.store.redis_store import RedisStore

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
RATE_PER_S = 600
BATCH = 5_000
SUMMARIES = 200
HISTORY_DAYS = 30
REPO = Path(__file__).resolve().parents[1]


class Idle:
    def notify(self) -> None:
        pass

    def resume(self, unsent, unresolved) -> None:
        pass


def command(server: RedisServer, *args: str | bytes):
    async def call():
        from paycore.service.store.resp import RedisClient
        client = RedisClient(server.url)
        try:
            return await client.execute(*args)
        finally:
            client.close()
    return uvloop.run(call())


def used_memory(server: RedisServer) -> int:
    info = command(server, "INFO", "memory")
    return int(re.search(rb"used_memory:(\d+)", info).group(1))


def hmget_calls(server: RedisServer) -> int:
    found = re.search(rb"cmdstat_hmget:calls=(\d+)", command(server, "INFO", "commandstats"))
    return int(found.group(1)) if found else 0


def memory_of(server: RedisServer, pattern: str) -> int:
    async def scan():
        from paycore.service.store.resp import RedisClient
        client = RedisClient(server.url)
        total, cursor = 0, b"0"
        try:
            while True:
                cursor, keys = await client.execute(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", 1000)
                sizes = [client.execute(b"MEMORY", b"USAGE", key, b"SAMPLES", b"0") for key in keys]
                total += sum(size or 0 for size in await asyncio.gather(*sizes))
                if cursor == b"0":
                    return total
        finally:
            client.close()
    return uvloop.run(scan())


async def settle(server: RedisServer, retention_days: int, times_ms: list[int]) -> None:
    """Accept and settle a payment at each requestedAt, through the store."""
    store = RedisStore(Settings(store=server.url, instance="bench", retention_days=retention_days))
    queue = RingQueue(BATCH)
    await store.start(queue, Idle())
    try:
        for first in range(0, len(times_ms), BATCH):
            batch = times_ms[first:first + BATCH]
            payments = [Payment(uuid.uuid4().bytes, 1000 + index % 9000) for index in range(len(batch))]
            await asyncio.gather(*(store.accept(payment) for payment in payments))
            while len(queue) < len(batch):
                await asyncio.sleep(0.005)
            while queue.pop() is not None:
                pass
            for index, (payment, at_ms) in enumerate(zip(payments, batch)):
                store.settle(Attempt(payment, index % 2, at_ms))
            while store.settles_in_flight:
                await asyncio.sleep(0.005)
    finally:
        await store.close()


def memory_report(server: RedisServer, payments: int, retention_days: int, now_ms: int) -> None:
    command(server, "FLUSHALL")
    before = used_memory(server)
    times_ms = [now_ms - (payments - index) * 1000 // RATE_PER_S for index in range(payments)]
    started = time.perf_counter()
    uvloop.run(settle(server, retention_days, times_ms))
    elapsed_s = time.perf_counter() - started
    grown = used_memory(server) - before
    paid = memory_of(server, "paycore:paid*")
    ledger = memory_of(server, "paycore:ledger:*")
    print(f"retention {retention_days or 'none'}: {payments:,} payments accepted and settled in "
          f"{elapsed_s:.1f} s; used_memory +{grown / payments:.0f} B per payment "
          f"(paid record {paid / payments:.0f} B, ledger {ledger / payments:.0f} B)", flush=True)


def summary_report(server: RedisServer, history: int, now_ms: int) -> None:
    spread_ms = HISTORY_DAYS * DAY_MS
    first_ms = now_ms - spread_ms
    uvloop.run(settle(server, 0, [first_ms + index * spread_ms // history for index in range(history)]))
    ranges = {"last hour": (now_ms - HOUR_MS, now_ms), "last day": (now_ms - DAY_MS, now_ms),
              f"last {HISTORY_DAYS} days": (first_ms, now_ms), "open from": (None, now_ms),
              "unbounded": (None, None)}

    async def timed(bounds) -> list[float]:
        store = RedisStore(Settings(store=server.url, instance="bench", store_lease_ms=600_000))
        await store.start(RingQueue(8), Idle())
        try:
            await store.summary(*bounds)
            took = []
            for _ in range(SUMMARIES):
                started = time.perf_counter()
                await store.summary(*bounds)
                took.append(time.perf_counter() - started)
            return took
        finally:
            await store.close()

    for name, bounds in ranges.items():
        calls = hmget_calls(server)
        took = uvloop.run(timed(bounds))
        per_summary = (hmget_calls(server) - calls) / (SUMMARIES + 1)
        print(f"summary, {name}: median {statistics.median(took) * 1e6:.0f} µs, "
              f"p99 {sorted(took)[int(len(took) * 0.99)] * 1e6:.0f} µs, {per_summary:.1f} HMGET", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=200_000)
    parser.add_argument("--history", type=int, default=200_000, help=f"payments over {HISTORY_DAYS} days")
    args = parser.parse_args()
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "build") as scratch:
        server = RedisServer(Path(scratch), durable=False).start()
        try:
            now_ms = time.time_ns() // 1_000_000
            for retention_days in (0, 30):
                memory_report(server, args.payments, retention_days, now_ms)
            summary_report(server, args.history, now_ms - HOUR_MS)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
