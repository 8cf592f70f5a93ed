"""What only the Redis store does: instances on one Redis claiming ids against
each other, taking over what a dead instance held (never what a live one
holds), refusing the send of a payment taken over, counting a payment once,
summing across bucket edges exactly, and sharing the health poll."""
from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from redis_server import ScratchRedis
from test_resp import run

from conftest import random_uuid
from paycore.core.ring_queue import RingQueue
from paycore.service.config import Settings
from paycore.service.payment import Attempt, Payment
from paycore.service.store.base import Acceptance
from paycore.service.store.redis_store import RedisStore

LEASE_MS = 300


class RecordingWork:
    """The dispatcher's side: what was handed over, and how often it was woken."""

    def __init__(self) -> None:
        self.unsent: list[tuple[bytes, int]] = []
        self.unresolved: list[tuple[bytes, int, int, int]] = []
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1

    def resume(self, unsent, unresolved) -> None:
        self.unsent += unsent
        self.unresolved += unresolved


def new_store(url: str, instance: str) -> RedisStore:
    return RedisStore(Settings(store=url, instance=instance, store_lease_ms=LEASE_MS))


@asynccontextmanager
async def running_store(url: str, instance: str, queue_capacity: int = 4096
                        ) -> AsyncIterator[tuple[RedisStore, RingQueue, RecordingWork]]:
    store = new_store(url, instance)
    queue = RingQueue(queue_capacity)
    work = RecordingWork()
    await store.start(queue, work)
    try:
        yield store, queue, work
    finally:
        await store.close()


async def until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def payment_ids(count: int) -> list[bytes]:
    return [random_uuid().bytes for _ in range(count)]


def test_one_id_posted_to_two_instances_at_once_is_accepted_once(redis_url):
    async def scenario():
        first, second = new_store(redis_url, "a"), new_store(redis_url, "b")
        ids = payment_ids(300)
        answers = await asyncio.gather(*(store.accept(Payment(uuid16, 1000))
                                         for uuid16 in ids for store in (first, second)))
        for index in range(0, len(answers), 2):
            assert sorted(answers[index:index + 2]) == [Acceptance.ACCEPTED, Acceptance.DUPLICATE]
        assert await first.accept(Payment(ids[0], 1001)) == Acceptance.CONFLICT
        assert await second.accept(Payment(ids[0], 1000)) == Acceptance.DUPLICATE
        await first.close()
        await second.close()

    run(scenario)


def test_new_payments_reach_the_queue_only_while_it_has_room(redis_url):
    async def scenario():
        async with running_store(redis_url, "a", queue_capacity=10) as (store, queue, work):
            ids = payment_ids(25)
            await asyncio.gather(*(store.accept(Payment(uuid16, 100 + index)) for index, uuid16 in enumerate(ids)))
            await until(lambda: len(queue) == 10)
            await asyncio.sleep(0.3)
            assert len(queue) == 10 and work.unsent == [] and work.notified > 0
            taken = [queue.pop() for _ in range(10)]
            await until(lambda: len(queue) == 10)
            taken += [queue.pop() for _ in range(10)]
            await until(lambda: len(queue) == 5)
            taken += [queue.pop() for _ in range(5)]
            assert taken == [(uuid16, 100 + index) for index, uuid16 in enumerate(ids)]

    run(scenario)


CRASHING_INSTANCE = f"""
import asyncio, sys
from paycore.core.ring_queue import RingQueue
from paycore.service.config import Settings
from paycore.service.payment import Attempt, Payment
from paycore.service.store.redis_store import RedisStore

class Idle:
    def notify(self): pass
    def resume(self, unsent, unresolved): pass

async def main(url, payments):
    store = RedisStore(Settings(store=url, instance="a", store_lease_ms={LEASE_MS}))
    queue = RingQueue(1024)
    await store.start(queue, Idle())
    while len(queue) < payments:
        await asyncio.sleep(0.01)
    uuid16, cents = queue.pop()
    assert await store.sending(Attempt(Payment(uuid16, cents), 1, 1234567))
    print(uuid16.hex(), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@asynccontextmanager
async def instance_a_holding(url: str, ids: list[bytes]
                             ) -> AsyncIterator[tuple[asyncio.subprocess.Process, bytes]]:
    """Instance "a" in its own process, holding the payments `ids` (accepted
    here): it has taken them all and recorded the send of the first one.
    Yields the process and that payment."""
    accepting = new_store(url, "accepting only")
    assert await asyncio.gather(*(accepting.accept(Payment(uuid16, 500)) for uuid16 in ids)) == [
        Acceptance.ACCEPTED] * len(ids)
    await accepting.close()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_INSTANCE, url, str(len(ids)), stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        assert line, "instance a did not start"
        yield process, bytes.fromhex(line.decode().strip())
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def consumers(redis_server) -> bytes:
    return redis_server.call("XINFO", "CONSUMERS", "paycore:pending", "dispatch")


def test_a_live_instance_keeps_its_payments_and_a_dead_one_loses_them_with_its_sends(redis_url, redis_server):
    async def scenario():
        ids = payment_ids(5)
        async with (instance_a_holding(redis_url, ids) as (process, sent_one),
                    running_store(redis_url, "b") as (store, queue, work)):
            # Held for many leases by a live instance: nothing moves.
            await asyncio.sleep(LEASE_MS * 5 / 1000)
            assert (work.unsent, work.unresolved, len(queue)) == ([], [], 0)
            assert b"$1\r\na\r\n" in consumers(redis_server)

            process.kill()
            await until(lambda: len(work.unsent) + len(work.unresolved) == 5, LEASE_MS * 4 / 1000)
            assert work.unresolved == [Attempt(Payment(sent_one, 500), 1, 1234567)]
            assert sorted(work.unsent) == sorted((uuid16, 500) for uuid16 in ids if uuid16 != sent_one)
            assert b"$1\r\nb\r\n" in consumers(redis_server)
            assert b"$1\r\na\r\n" not in consumers(redis_server)  # nothing left: forgotten

            # "a" comes back (a stalled process, a restart holding on to it):
            # the payment is not its to send or to resume any more.
            returning = new_store(redis_url, "a")
            assert await returning.sending(Attempt(Payment(sent_one, 500), 0, 7654321)) is False
            assert await store.sending(Attempt(Payment(sent_one, 500), 0, 7654321)) is True
            # Both report it held: it counts once.
            returning.settle(Attempt(Payment(sent_one, 500), 1, 1234567))
            store.settle(Attempt(Payment(sent_one, 500), 0, 7654321))
            await returning.close()
            await until(lambda: store.settles_in_flight == 0)
            totals = await store.summary(None, None)
            assert totals[0] + totals[2] == 1 and totals[1] + totals[3] == 500

    run(scenario)


def test_a_restarted_instance_resumes_what_it_held(redis_url):
    async def scenario():
        ids = payment_ids(4)
        async with instance_a_holding(redis_url, ids) as (process, sent_one):
            process.kill()
        async with running_store(redis_url, "a") as (_, queue, work):
            assert work.unresolved == [Attempt(Payment(sent_one, 500), 1, 1234567)]
            assert sorted(work.unsent) == sorted((uuid16, 500) for uuid16 in ids if uuid16 != sent_one)
            assert len(queue) == 0  # resumed, not delivered a second time

    run(scenario)


def test_a_clean_close_hands_what_is_left_to_the_others_at_once(redis_url):
    async def scenario():
        closing = new_store(redis_url, "a")
        queue_a = RingQueue(1024)
        await closing.start(queue_a, RecordingWork())
        ids = payment_ids(3)
        await asyncio.gather(*(closing.accept(Payment(uuid16, 700)) for uuid16 in ids))
        await until(lambda: len(queue_a) == 3)
        async with running_store(redis_url, "b") as (_, _, work_b):
            await closing.close()
            started = time.monotonic()
            await until(lambda: len(work_b.unsent) == 3)
            assert time.monotonic() - started < LEASE_MS / 1000  # sooner than its lease would expire

    run(scenario)


def test_a_payment_settled_twice_counts_once(redis_url):
    async def scenario():
        async with running_store(redis_url, "a") as (store, queue, _):
            ids = payment_ids(2)
            await asyncio.gather(*(store.accept(Payment(uuid16, 250)) for uuid16 in ids))
            await until(lambda: len(queue) == 2)
            for uuid16 in ids:
                assert await store.sending(Attempt(Payment(uuid16, 250), 0, 1_700_000_000_123)) is True
            store.settle(Attempt(Payment(ids[0], 250), 0, 1_700_000_000_123))
            store.settle(Attempt(Payment(ids[0], 250), 0, 1_700_000_000_123))
            store.settle(Attempt(Payment(ids[1], 250), 1, 1_700_000_000_999))
            store.settle(Attempt(Payment(ids[1], 250), 0, 1_700_000_000_123))
            await until(lambda: store.settles_in_flight == 0)
            assert await store.summary(None, None) == (1, 250, 1, 250)
            assert await store.accept(Payment(ids[0], 250)) == Acceptance.DUPLICATE
            assert await store.accept(Payment(ids[0], 251)) == Acceptance.CONFLICT
            assert await store.summary(1_700_000_000_123, 1_700_000_000_123) == (1, 250, 0, 0)
            # Settled: no longer this instance's to send.
            assert await store.sending(Attempt(Payment(ids[0], 250), 0, 1_700_000_000_500)) is False

    run(scenario)


def test_a_settle_redis_drops_is_sent_again(tmp_path):
    with ScratchRedis(str(tmp_path)) as server:
        async def scenario():
            async with running_store(server.url, "a") as (store, queue, _):
                payment = payment_ids(1)[0]
                await store.accept(Payment(payment, 900))
                await until(lambda: len(queue) == 1)
                assert await store.sending(Attempt(Payment(payment, 900), 0, 1_700_000_000_000))
                # Redis holds writes back, then drops the connection the settle waits on.
                server.call("CLIENT", "PAUSE", "500", "WRITE")
                store.settle(Attempt(Payment(payment, 900), 0, 1_700_000_000_000))
                await asyncio.sleep(0.1)
                assert server.call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") != b":0\r\n"
                await until(lambda: store.settles_in_flight == 0)
                assert await store.summary(None, None) == (1, 900, 0, 0)

        run(scenario)


def brute_force(payments: list[tuple[int, int, int]], from_ms: int | None, to_ms: int | None):
    totals = [0, 0, 0, 0]
    for processor, requested_at_ms, cents in payments:
        if (from_ms is None or requested_at_ms >= from_ms) and (to_ms is None or requested_at_ms <= to_ms):
            totals[processor * 2] += 1
            totals[processor * 2 + 1] += cents
    return tuple(totals)


def test_summary_matches_a_brute_force_sum_across_seconds_and_their_edges(redis_url):
    rng = random.Random(20250821)
    base_ms = 1_755_000_000_000
    span_ms = 12_000
    # Crowded around second boundaries, with amounts past a double's exact range in the sums.
    times = [base_ms + rng.choice((rng.randrange(span_ms), rng.randrange(0, span_ms, 1000),
                                   rng.randrange(999, span_ms, 1000))) for _ in range(1500)]
    payments = [(rng.randrange(2), at, rng.choice((rng.randint(1, 10_000), rng.randint(1, 99_999_999_999_999))))
                for at in times]
    edges = sorted({base_ms - 1000, base_ms, *(at + delta for at in times[:40] for delta in (-1, 0, 1)),
                    *(base_ms + second * 1000 + delta for second in range(13) for delta in (-1, 0, 1))})

    async def scenario():
        async with running_store(redis_url, "a") as (store, queue, _):
            assert await store.summary(None, None) == (0, 0, 0, 0)
            ids = payment_ids(len(payments))
            await asyncio.gather(*(store.accept(Payment(uuid16, cents)) for uuid16, (_, _, cents) in zip(ids, payments)))
            await until(lambda: len(queue) == len(payments))
            for uuid16, (processor, requested_at_ms, cents) in zip(ids, payments):
                store.settle(Attempt(Payment(uuid16, cents), processor, requested_at_ms))
            await until(lambda: store.settles_in_flight == 0)

            bounds = [(None, None), (None, base_ms + 5_500), (base_ms + 5_500, None), (base_ms + 9, base_ms + 3)]
            bounds += [(rng.choice(edges), rng.choice(edges)) for _ in range(150)]
            bounds += [(low, low + rng.choice((0, 1, 998, 999, 1000, 1001, 1999)))
                       for low in (rng.choice(edges) for _ in range(100))]
            bounds += [(rng.choice((None, low)), rng.choice((None, high)))
                       for low, high in ((rng.choice(edges), rng.choice(edges)) for _ in range(50))]
            answers = await asyncio.gather(*(store.summary(low, high) for low, high in bounds))
            for (low, high), answer in zip(bounds, answers):
                assert answer == brute_force(payments, low, high), (low, high)
            assert answers[0][1] + answers[0][3] > 2**53

    run(scenario)


def ledger_keys(redis_server) -> bytes:
    return redis_server.call("KEYS", "paycore:ledger:*:*")


def test_purge_forgets_the_ledger_only_and_sweeps_its_keys(redis_url, redis_server):
    async def scenario():
        async with running_store(redis_url, "a", queue_capacity=1) as (store, queue, _):
            settled, pending = payment_ids(2)
            await store.accept(Payment(settled, 100))
            await until(lambda: len(queue) == 1)
            assert await store.sending(Attempt(Payment(settled, 100), 0, 1_700_000_000_000))
            store.settle(Attempt(Payment(settled, 100), 0, 1_700_000_000_000))
            await store.accept(Payment(pending, 200))
            await until(lambda: store.settles_in_flight == 0)
            assert b"paycore:ledger:0:" in ledger_keys(redis_server)

            assert await store.purge() is None
            assert await store.summary(None, None) == (0, 0, 0, 0)
            await store.swept()
            assert ledger_keys(redis_server) == b"*0\r\n"
            # Neither is taken again: the paid one is not paid twice, the pending one not sent twice.
            assert await store.accept(Payment(settled, 100)) == Acceptance.DUPLICATE
            assert await store.accept(Payment(pending, 200)) == Acceptance.DUPLICATE
            assert await store.accept(Payment(pending, 201)) == Acceptance.CONFLICT
            queue.pop()
            await until(lambda: len(queue) == 1)
            assert queue.pop() == (pending, 200)
            assert await store.sending(Attempt(Payment(pending, 200), 1, 1_700_000_000_001))
            store.settle(Attempt(Payment(pending, 200), 1, 1_700_000_000_001))
            await until(lambda: store.settles_in_flight == 0)
            assert await store.summary(None, None) == (0, 0, 1, 200)
            assert b"paycore:ledger:1:" in ledger_keys(redis_server)

    run(scenario)


def test_an_unreachable_redis_fails_the_acceptance():
    async def scenario():
        with socket.socket() as bound_not_listening:
            bound_not_listening.bind(("127.0.0.1", 0))
            store = new_store(f"redis://127.0.0.1:{bound_not_listening.getsockname()[1]}/0", "a")
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(store.accept(Payment(random_uuid().bytes, 100)), 1)
            await store.close()

    run(scenario)


def test_one_health_poll_per_interval_across_instances_and_reports_in_local_time(redis_url):
    async def scenario():
        first, second = new_store(redis_url, "a"), new_store(redis_url, "b")
        turn = await first.health.claim_poll(400)
        assert turn is not None and abs(turn - time.monotonic() * 1000) < 50
        assert await second.health.claim_poll(400) is None
        assert await first.health.claim_poll(400) is None
        await asyncio.sleep(0.45)  # the turn expires by itself
        assert await second.health.claim_poll(400) is not None
        assert await first.health.claim_poll(400) is None

        assert await second.health.latest() is None
        observed_at = time.monotonic() * 1000 - 250
        await first.health.publish({"default": {"failing": False, "minResponseTime": 10, "observedAt": observed_at},
                                    "fallback": {"failing": True, "minResponseTime": 0, "observedAt": observed_at}})
        reports = await second.health.latest()
        assert reports["default"]["minResponseTime"] == 10 and reports["fallback"]["failing"] is True
        assert abs(reports["default"]["observedAt"] - observed_at) < 5
        assert await second.health.latest() is None  # unchanged since
        await first.health.publish({"default": {"failing": True, "minResponseTime": 20, "observedAt": observed_at}})
        reports = await second.health.latest()
        assert reports["default"]["failing"] is True and reports["fallback"]["failing"] is True
        await first.close()
        await second.close()

    run(scenario)
