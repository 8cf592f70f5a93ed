"""What the Redis store keeps, for a service that runs for months: nothing
grows with the payments accepted but the paid record and the ledger, both
kept with the retention; a summary reads a bounded number of buckets
whatever its range and the history; sums stay exact past int64; and the
store refuses a Redis that may evict its keys."""
from __future__ import annotations

import re
import time

import pytest
from conftest import random_uuid, test_random
from redis_server import ScratchRedis
from test_redis_store import brute_force, running_store, until
from test_resp import run

from paycore.core.ring_queue import RingQueue
from paycore.service.config import Settings
from paycore.service.payment import Attempt, Payment
from paycore.service.store.base import Acceptance
from paycore.service.store.redis import ledger
from paycore.service.store.redis_store import RedisStore

DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS
# At most one run of sibling buckets per level on each side of a range.
MAX_HASHES_PER_SUMMARY = 2 * ledger.LEVELS


class Idle:
    def notify(self) -> None:
        pass

    def resume(self, unsent, unresolved) -> None:
        pass


async def settle_all(store: RedisStore, queue: RingQueue, payments: list[tuple[int, int, int]]) -> list[bytes]:
    """Accept, take and settle (processor, requestedAt, cents) each; their ids."""
    ids = [random_uuid().bytes for _ in payments]
    for uuid16, (_, _, cents) in zip(ids, payments):
        assert await store.accept(Payment(uuid16, cents)) == Acceptance.ACCEPTED
    await until(lambda: len(queue) == len(payments), 10)
    for _ in payments:
        queue.pop()
    for uuid16, (processor, requested_at_ms, cents) in zip(ids, payments):
        store.settle(Attempt(Payment(uuid16, cents), processor, requested_at_ms))
    await until(lambda: store.settles_in_flight == 0, 10)
    return ids


def integer(redis_server, *command: str) -> int:
    reply = redis_server.call(*command)
    assert reply.startswith(b":"), reply
    return int(reply[1:])


def command_calls(redis_server) -> dict[str, int]:
    """Calls so far of each command, those run by scripts included."""
    return {name.decode(): int(calls) for name, calls in
            re.findall(rb"cmdstat_([a-z|]+):calls=(\d+)", redis_server.call("INFO", "commandstats"))}


def commands_run(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: calls - before.get(name, 0) for name, calls in after.items()
            if calls > before.get(name, 0) and name != "info"}


def test_nothing_but_the_paid_record_and_the_ledger_grows_with_payments(redis_url, redis_server):
    async def scenario():
        async with running_store(redis_url, "a") as (store, queue, _):
            now_ms = int(time.time() * 1000)
            ids = await settle_all(store, queue, [(index % 2, now_ms + index, 100) for index in range(300)])
            for empty in (("HLEN", "paycore:entry"), ("HLEN", "paycore:sent"), ("XLEN", "paycore:pending")):
                assert integer(redis_server, *empty) == 0, empty
            assert integer(redis_server, "EXISTS", "paycore:ids", "paycore:ledger:seconds",
                           "paycore:ledger:millis", "paycore:paid:days") == 0
            assert integer(redis_server, "HLEN", "paycore:paid") == 300
            # No retention: the paid record is the durable record, kept for ever.
            assert integer(redis_server, "PTTL", "paycore:paid") == -1
            assert integer(redis_server, "PTTL", f"paycore:ledger:0:0:{now_ms >> 4}") == -1
            # Known at any age once paid: never sent or counted again.
            assert await store.accept(Payment(ids[0], 100)) == Acceptance.DUPLICATE
            assert await store.accept(Payment(ids[0], 101)) == Acceptance.CONFLICT
            assert await store.summary(None, None) == (150, 15_000, 150, 15_000)

    run(scenario)


def test_with_a_retention_the_ledger_expires_and_old_paid_ids_are_forgotten(redis_url, redis_server):
    retention_days = 2

    async def scenario():
        store = RedisStore(Settings(store=redis_url, instance="a", retention_days=retention_days))
        queue = RingQueue(64)
        await store.start(queue, Idle())
        try:
            now_ms = int(time.time() * 1000)
            old_ms, recent_ms = now_ms - 5 * DAY_MS, now_ms - 1000
            old, recent = await settle_all(store, queue, [(0, old_ms, 700), (1, recent_ms, 300)])
            assert integer(redis_server, "HLEN", "paycore:paid") == 2
            # The old payment's fine buckets expired on arrival; the coarse ones that
            # still hold it are never read, the summary starts at the retention's day.
            assert integer(redis_server, "EXISTS", f"paycore:ledger:0:0:{old_ms >> 4}") == 0
            assert await store.summary(None, None) == (0, 0, 1, 300)
            assert await store.summary(old_ms, old_ms) == (0, 0, 0, 0)
            kept_ms = (retention_days + 1) * DAY_MS + ledger.EXPIRY_MARGIN_MS
            for level in range(4):
                span_ms = 16 ** (level + 1)
                parent = recent_ms // span_ms
                expires_in_ms = integer(redis_server, "PTTL", f"paycore:ledger:0:{level}:{parent}")
                expected_ms = (parent + 1) * span_ms + kept_ms - int(time.time() * 1000)
                assert abs(expires_in_ms - expected_ms) < 2_000, (level, expires_in_ms, expected_ms)

            await store.forget_past_retention()
            assert integer(redis_server, "HLEN", "paycore:paid") == 1
            assert integer(redis_server, "ZCARD", "paycore:paid:days") == 1
            # Past the retention an id is forgotten, as by the embedded record.
            assert await store.accept(Payment(old, 700)) == Acceptance.ACCEPTED
            assert await store.accept(Payment(recent, 300)) == Acceptance.DUPLICATE
        finally:
            await store.close()

    run(scenario)


def test_a_summary_reads_a_bounded_number_of_buckets_whatever_the_history(redis_url, redis_server):
    rng = test_random
    now_ms = int(time.time() * 1000)
    # Thirty years of history, crowded in the last hour and around bucket edges.
    times = [rng.choice((now_ms - rng.randrange(30 * YEAR_MS), now_ms - rng.randrange(3_600_000),
                         now_ms // 65536 * 65536 + rng.randrange(-3, 3))) for _ in range(1500)]
    payments = [(rng.randrange(2), at, rng.randint(1, 10**13)) for at in times]

    async def scenario():
        # A long lease: the lease and the takeover of dead instances stay quiet while summaries are counted.
        store = RedisStore(Settings(store=redis_url, instance="a", store_lease_ms=600_000))
        queue = RingQueue(2048)
        await store.start(queue, Idle())
        try:
            await settle_all(store, queue, payments)
            edges = [at + delta for at in rng.sample(times, 60) for delta in (-1, 0, 1)]
            bounds = [(None, None), (None, now_ms), (now_ms - 3_600_000, None), (now_ms - 3_600_000, now_ms),
                      (-2**63, 2**63), (now_ms - 30 * YEAR_MS, now_ms)]
            bounds += [tuple(sorted(rng.sample(edges, 2))) for _ in range(200)]
            bounds += [(low, None) for low in rng.sample(edges, 20)] + [(None, high) for high in rng.sample(edges, 20)]
            for low, high in bounds:
                before = command_calls(redis_server)
                assert await store.summary(low, high) == brute_force(payments, low, high), (low, high)
                run = commands_run(before, command_calls(redis_server))
                run.pop("xreadgroup", None)  # the feeder, waiting for new payments
                # One script, the generation, and at most so many hashes: no walk through the history.
                assert set(run) <= {"evalsha", "get", "hmget"}, (low, high, run)
                assert run.get("hmget", 0) <= MAX_HASHES_PER_SUMMARY, (low, high, run)
        finally:
            await store.close()

    run(scenario)


def test_cents_are_summed_exactly_past_int64(redis_url):
    # Low parts that carry into the high part on the second payment of a bucket.
    amounts = [2**62 + 2**32 - 1, 2**62 + 2**32 - 7, 2**61 + 12_345, 2**32 - 1, 2**32 - 1, 1]
    base_ms = 1_755_000_000_000
    payments = [(0, base_ms + index % 3, cents) for index, cents in enumerate(amounts)]
    payments += [(1, base_ms + 1, cents) for cents in amounts]

    async def scenario():
        async with running_store(redis_url, "a") as (store, queue, _):
            await settle_all(store, queue, payments)
            for low, high in ((None, None), (base_ms, base_ms), (base_ms + 1, base_ms + 1),
                              (base_ms, base_ms + 2), (base_ms - YEAR_MS, base_ms + YEAR_MS)):
                assert await store.summary(low, high) == brute_force(payments, low, high), (low, high)
            total = await store.summary(None, None)
            assert total[1] > 2**63 and total[3] > 2**63

    run(scenario)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_a_redis_that_may_evict_keys_is_refused(redis_url, redis_server, policy):
    async def scenario():
        store = RedisStore(Settings(store=redis_url, instance="a"))
        with pytest.raises(SystemExit, match=f"maxmemory-policy {policy}.*set maxmemory-policy noeviction"):
            await store.start(RingQueue(8), Idle())
        await store.close()

    assert redis_server.call("CONFIG", "SET", "maxmemory-policy", policy) == b"+OK\r\n"
    try:
        run(scenario)
    finally:
        redis_server.call("CONFIG", "SET", "maxmemory-policy", "noeviction")


class RedisWithoutConfig(ScratchRedis):
    def command(self) -> list[str]:
        return [*super().command(), "--rename-command", "CONFIG", ""]


def test_a_redis_hiding_its_policy_is_refused_unless_vouched_for(tmp_path):
    with RedisWithoutConfig(str(tmp_path)) as server:
        async def scenario():
            refused = RedisStore(Settings(store=server.url, instance="a"))
            with pytest.raises(SystemExit, match="PAYCORE_STORE_ASSUME_NOEVICTION=1"):
                await refused.start(RingQueue(8), Idle())
            await refused.close()
            vouched = RedisStore(Settings(store=server.url, instance="a", store_assume_noeviction=True))
            await vouched.start(RingQueue(8), Idle())
            await vouched.close()

        run(scenario)
