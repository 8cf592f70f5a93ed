"""The store contract (service/store/base.py), run against every store: the
embedded one (shared memory + journals), with its data on disk (journal
written by a thread) and on tmpfs (written on the loop), and Redis (a real
redis-server).

Each test opens stores for several instances on one backing (a shared
directory, or one Redis database), as the instances of one deployment do."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from conftest import random_uuid
from paycore.core.ring_queue import RingQueue
from paycore.service.config import Settings
from paycore.service.payment import Attempt, Payment
from paycore.service.store import Acceptance, Store, open_store
from paycore.service.store.base import PaymentStatus, resolve

DEFAULT, FALLBACK = 0, 1
HEALTH_INTERVAL_MS = 300
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Model:
    """The ledger by brute force: totals per requestedAt, summed over the keys in range."""

    def __init__(self) -> None:
        self.totals_by_key: dict[int, list[int]] = {}

    def record(self, processor: int, key: int, cents: int) -> None:
        totals = self.totals_by_key.setdefault(key, [0, 0, 0, 0])
        totals[2 * processor] += 1
        totals[2 * processor + 1] += cents

    def summary(self, first: int | None = None, last: int | None = None) -> tuple[int, int, int, int]:
        in_range = [totals for key, totals in self.totals_by_key.items()
                    if (first is None or key >= first) and (last is None or key <= last)]
        return tuple(map(sum, zip([0, 0, 0, 0], *in_range)))


class RecordingWork:
    """The dispatcher's side of a store: what it was handed."""

    def __init__(self) -> None:
        self.notified = 0
        self.unsent: list[Payment] = []
        self.unresolved: list[Attempt] = []

    def notify(self) -> None:
        self.notified += 1

    def resume(self, unsent, unresolved) -> None:
        self.unsent += unsent
        self.unresolved += unresolved


class Deployment:
    """Stores of named instances on one backing; each started with its own queue."""

    def __init__(self, settings_for: Callable[[str], Settings]) -> None:
        self._settings_for = settings_for
        self.open: dict[str, tuple[Store, RingQueue, RecordingWork]] = {}

    async def start(self, instance: str) -> Store:
        store = open_store(self._settings_for(instance))
        queue, work = RingQueue(1024), RecordingWork()
        await store.start(queue, work)
        self.open[instance] = (store, queue, work)
        return store

    async def stop(self, instance: str) -> None:
        store, _, _ = self.open.pop(instance)
        await store.close()

    async def stop_all(self) -> None:
        for instance in list(self.open):
            await self.stop(instance)

    def queue(self, instance: str) -> RingQueue:
        return self.open[instance][1]

    def work(self, instance: str) -> RecordingWork:
        return self.open[instance][2]

    def drain_queues(self) -> list[tuple[Store, Payment]]:
        """Everything on the queues, each with the store of the instance that took it."""
        return [(store, Payment(*popped)) for store, queue, _ in self.open.values()
                for popped in iter(queue.pop, None)]


@pytest.fixture(params=["embedded", "embedded-in-memory", "redis"])
def deployment_settings(request, tmp_path) -> Callable[[str], Settings]:
    store = "redis" if request.param == "redis" else "embedded"
    if store == "redis":
        store = request.getfixturevalue("redis_url")
    data_parent = request.getfixturevalue("memory_path") if request.param == "embedded-in-memory" else tmp_path

    def settings_for(instance: str) -> Settings:
        return Settings(instance=instance, store=store, store_lease_ms=600, shared_dir=str(tmp_path / "shared"),
                        data_dir=str(data_parent / "data"), idempotency_capacity=4096, ledger_tail_capacity=1024,
                        metrics_listen="")
    return settings_for


def run(deployment_settings, scenario: Callable[[Deployment], Awaitable[None]]) -> None:
    async def main() -> None:
        deployment = Deployment(deployment_settings)
        try:
            await asyncio.wait_for(scenario(deployment), 30)
        finally:
            await deployment.stop_all()
    uvloop.run(main())


async def accept(store: Store, uuid16: bytes, cents: int) -> Acceptance:
    acceptance = store.accept(Payment(uuid16, cents))
    store.flush_waiting()
    acceptance = await resolve(acceptance)
    answered = asyncio.get_running_loop().create_future()
    store.after_durable(store.promised, answered.set_result, None)
    store.flush_waiting()
    await answered  # as the HTTP layer does: the answer leaves once the store holds the payment
    return acceptance


async def send_and_settle(store: Store, payment: Payment, processor: int, requested_at_ms: int) -> None:
    attempt = Attempt(payment, processor, requested_at_ms)
    sending = store.sending(attempt)
    store.flush_waiting()
    assert await resolve(sending) is True
    store.settle(attempt)
    store.flush_waiting()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_an_id_is_accepted_once_whichever_instance_sees_it(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        first, second = await deployment.start("a"), await deployment.start("b")
        uuid16 = random_uuid().bytes
        assert await accept(first, uuid16, 1995) == Acceptance.ACCEPTED
        assert await accept(second, uuid16, 1995) == Acceptance.DUPLICATE
        assert await accept(first, uuid16, 1995) == Acceptance.DUPLICATE
        assert await accept(second, uuid16, 1996) == Acceptance.CONFLICT
    run(deployment_settings, scenario)


def test_no_instance_says_already_accepted_before_the_claim_is_durable(deployment_settings):
    """A 2xx is only ever given for a payment some instance's store holds:
    the same id posted to another instance meanwhile waits for the claim."""
    async def scenario(deployment: Deployment) -> None:
        first, second = await deployment.start("a"), await deployment.start("b")
        for store in (first, second):
            # A first call can take longer (Redis loads the store's scripts):
            # made beforehand, so the race below starts with the first claim ahead.
            assert await accept(store, random_uuid().bytes, 1994) == Acceptance.ACCEPTED
        payment = Payment(random_uuid().bytes, 1995)
        events = []
        claimed = first.accept(payment)
        first.after_durable(first.promised, events.append, "claim durable")
        duplicate = second.accept(payment)
        if isinstance(duplicate, asyncio.Future):
            duplicate.add_done_callback(lambda _: events.append("duplicate answered"))
        else:
            events.append("duplicate answered")
        first.flush_waiting()
        second.flush_waiting()
        assert await resolve(claimed) == Acceptance.ACCEPTED
        assert await resolve(duplicate) == Acceptance.DUPLICATE
        await eventually(lambda: len(events) == 2, "the claim never became durable")
        assert events == ["claim durable", "duplicate answered"]
    run(deployment_settings, scenario)


def test_every_accepted_payment_is_pending_on_exactly_one_instance(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        stores = [await deployment.start(name) for name in ("a", "b", "c")]
        accepted = {}
        for index in range(90):
            uuid16 = random_uuid().bytes
            accepted[uuid16] = 100 + index
            assert await accept(stores[index % 3], uuid16, 100 + index) == Acceptance.ACCEPTED
        taken = await _take(deployment, len(accepted))
        await asyncio.sleep(0.2)  # nothing arrives twice, even late
        assert deployment.drain_queues() == []
        assert {uuid16: payment.cents for uuid16, (_, payment) in taken.items()} == accepted
        assert sum(deployment.work(name).notified > 0 for name in deployment.open) >= 1
    run(deployment_settings, scenario)


def test_an_answer_waits_for_the_store_to_hold_the_payment(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        store = await deployment.start("a")
        answered = []
        acceptance = await resolve(store.accept(Payment(random_uuid().bytes, 100)))
        store.after_durable(store.promised, answered.append, "first")
        store.after_durable(store.promised, answered.append, "second")
        store.flush_waiting()
        await eventually(lambda: len(answered) == 2, "answers never released")
        assert acceptance == Acceptance.ACCEPTED
        assert answered == ["first", "second"]
    run(deployment_settings, scenario)


def test_settled_payments_are_summed_exactly_for_every_instance(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        stores = [await deployment.start(name) for name in ("a", "b")]
        rng = random.Random(7)
        model = Model()
        base_ms = 1_760_000_000_000
        payments = 400
        for _ in range(payments):
            assert await accept(rng.choice(stores), random_uuid().bytes, rng.randint(1, 100_000)) \
                == Acceptance.ACCEPTED
        # Sent and settled by the instance that took each payment from the pending ones.
        for store, payment in (await _take(deployment, payments)).values():
            # Clustered around a few second boundaries, so ranges cut seconds in parts.
            requested_at_ms = (base_ms + rng.choice((0, 1000, 2000, 60_000))
                               + rng.randint(-3, 3) * rng.choice((1, 7, 250)))
            processor = rng.choice((DEFAULT, FALLBACK))
            await send_and_settle(store, payment, processor, requested_at_ms)
            model.record(processor, requested_at_ms, payment.cents)
        keys = sorted(model.totals_by_key)

        async def summaries_match() -> None:
            for _ in range(60):
                bounds = [None if rng.random() < 0.1 else rng.choice(keys) + rng.choice((-1000, -1, 0, 1, 999))
                          for _ in range(2)]
                if rng.random() < 0.05:
                    bounds = [INT64_MIN + 1, INT64_MAX - 1]
                for store in stores:
                    assert await resolve(store.summary(*bounds)) == model.summary(*bounds), bounds
        deadline = time.monotonic() + 5
        while True:  # a settle nobody waits on may still be on its way
            try:
                await summaries_match()
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert await resolve(stores[0].summary(keys[-1] + 1, keys[0] - 1)) == (0, 0, 0, 0)
    run(deployment_settings, scenario)


def test_summaries_asked_together_share_a_read_that_a_settlement_ends(deployment_settings):
    """The embedded store answers the summaries of one range asked in one turn
    of the loop with one read (a client pipelining thousands holds one), and
    one asked after a settlement counts it. (Redis counts a settlement when its
    write lands: eventually, as the test above waits for.)"""
    if deployment_settings("a").store != "embedded":
        pytest.skip("a Redis settlement is counted once its write lands")

    async def scenario(deployment: Deployment) -> None:
        store = await deployment.start("a")
        first, second = Payment(random_uuid().bytes, 1000), Payment(random_uuid().bytes, 2500)
        for payment in (first, second):
            assert await accept(store, payment.correlation_id, payment.cents) == Acceptance.ACCEPTED
        taken = await _take(deployment, 2)
        requested_at_ms = 1_760_000_000_000
        attempts = {uuid16: Attempt(payment, DEFAULT, requested_at_ms) for uuid16, (_, payment) in taken.items()}
        for attempt in attempts.values():
            sending = store.sending(attempt)
            store.flush_waiting()
            assert await resolve(sending) is True
        store.settle(attempts[first.correlation_id])
        together = [store.summary(None, None) for _ in range(3)]
        assert together[0] is together[1] is together[2]
        store.settle(attempts[second.correlation_id])
        after = store.summary(None, None)
        assert after is not together[0]
        # The shared read counts the first, and may count the second too (the
        # record may commit it before the read): a summary is of some moment
        # between its request and its answer.
        assert await resolve(together[0]) in ((1, 1000, 0, 0), (2, 3500, 0, 0))
        assert await resolve(after) == (2, 3500, 0, 0)
    run(deployment_settings, scenario)


def test_purge_forgets_the_ledger_not_the_ids_nor_the_pending_payments(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        first, second = await deployment.start("a"), await deployment.start("b")
        settled, pending = random_uuid().bytes, random_uuid().bytes
        for uuid16 in (settled, pending):
            assert await accept(first, uuid16, 500) == Acceptance.ACCEPTED
        taken = await _take(deployment, 2)
        await send_and_settle(*taken[settled], DEFAULT, 1_000)
        await _wait_for_totals(first, (1, 500, 0, 0))

        await resolve(second.purge())
        await _wait_for_totals(first, (0, 0, 0, 0))
        await _wait_for_totals(second, (0, 0, 0, 0))
        # Posted again after the purge, neither is taken again: never paid nor counted twice.
        assert await accept(second, settled, 500) == Acceptance.DUPLICATE
        assert await accept(first, pending, 500) == Acceptance.DUPLICATE
        assert await accept(second, pending, 700) == Acceptance.CONFLICT
        await asyncio.sleep(0.1)
        assert deployment.drain_queues() == []
        # The payment still pending is still delivered, and counted after the purge.
        await send_and_settle(*taken[pending], FALLBACK, 2_000)
        await _wait_for_totals(second, (0, 0, 1, 500))
        await _wait_for_totals(first, (0, 0, 1, 500))
    run(deployment_settings, scenario)


def test_a_settled_payment_and_a_pending_one_can_be_looked_up(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        first, second = await deployment.start("a"), await deployment.start("b")
        settled, pending, unknown = (random_uuid().bytes for _ in range(3))
        await _settle_the_first_of(deployment, first, (settled, pending), 2005, FALLBACK)
        for store in (first, second):
            assert await resolve(store.lookup(pending)) == PaymentStatus(Payment(pending, 2005), None)
            assert await resolve(store.lookup(unknown)) is None
    run(deployment_settings, scenario)


def test_a_payment_settled_before_is_never_sent_again(deployment_settings):
    """Whatever brings it back (a resume, a re-post past the idempotency
    window), a send of a settled payment is refused by every instance; sends
    asked in one turn share the record's answer, each hearing it."""
    async def scenario(deployment: Deployment) -> None:
        first, second = await deployment.start("a"), await deployment.start("b")
        settled, fresh = random_uuid().bytes, random_uuid().bytes
        taken = await _settle_the_first_of(deployment, first, (settled, fresh), 1234, DEFAULT)
        taker, payment = taken[fresh]
        for store in (first, second):
            again = [store.sending(Attempt(Payment(settled, 1234), FALLBACK, 1_700_000_000_999))
                     for _ in range(2)]
            new = taker.sending(Attempt(payment, FALLBACK, 1_700_000_000_999)) if taker is store else None
            store.flush_waiting()
            assert [await resolve(sending) for sending in again] == [False, False]
            if new is not None:
                assert await resolve(new) is True
    run(deployment_settings, scenario)


async def _settle_the_first_of(deployment: Deployment, accepting: Store, uuid16s: tuple[bytes, ...],
                               cents: int, processor: int) -> dict[bytes, tuple[Store, Payment]]:
    """Accept the payments, send and settle the first, and wait until every
    instance can look it up as settled; what each instance took."""
    for uuid16 in uuid16s:
        assert await accept(accepting, uuid16, cents) == Acceptance.ACCEPTED
    taken = await _take(deployment, len(uuid16s))
    settled = uuid16s[0]
    await send_and_settle(*taken[settled], processor, 1_700_000_000_123)
    settled_status = PaymentStatus(Payment(settled, cents),
                                   Attempt(Payment(settled, cents), processor, 1_700_000_000_123))
    for store, _, _ in deployment.open.values():
        await eventually_async(lambda store=store: _looked_up(store, settled), settled_status)
    return taken


async def _looked_up(store: Store, uuid16: bytes) -> PaymentStatus | None:
    return await resolve(store.lookup(uuid16))


async def eventually_async(read: Callable[[], Awaitable], expected, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (current := await read()) != expected:
        assert time.monotonic() < deadline, (current, expected)
        await asyncio.sleep(0.01)


async def _take(deployment: Deployment, count: int) -> dict[bytes, tuple[Store, Payment]]:
    """Wait until `count` payments reach the instances' queues: uuid16 -> (the
    store of the instance that took it, the payment). None may arrive twice."""
    taken: dict[bytes, tuple[Store, Payment]] = {}

    def all_taken() -> bool:
        for store, payment in deployment.drain_queues():
            assert payment.correlation_id not in taken, "a payment pending on two instances"
            taken[payment.correlation_id] = (store, payment)
        return len(taken) >= count
    await eventually(all_taken, "accepted payments did not reach a queue")
    return taken


async def _wait_for_totals(store: Store, totals: tuple[int, int, int, int]) -> None:
    deadline = time.monotonic() + 5
    while (current := await resolve(store.summary(None, None))) != totals:
        assert time.monotonic() < deadline, (current, totals)
        await asyncio.sleep(0.02)


def test_a_restarted_instance_resumes_what_it_left(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        store = await deployment.start("a")
        unsent, sent, settled = (Payment(random_uuid().bytes, 250) for _ in range(3))
        for payment in (unsent, sent, settled):
            assert await accept(store, *payment) == Acceptance.ACCEPTED
        await eventually(lambda: len(deployment.queue("a")) == 3, "payments not queued")
        sending = store.sending(Attempt(sent, FALLBACK, 1_234))
        store.flush_waiting()
        assert await resolve(sending) is True
        await send_and_settle(store, settled, DEFAULT, 1_235)
        await _wait_for_totals(store, (1, 250, 0, 0))
        await deployment.stop("a")

        restarted = await deployment.start("a")
        work = deployment.work("a")
        resumed_unsent = work.unsent + [payment for _, payment in deployment.drain_queues()]
        assert resumed_unsent == [unsent]
        assert work.unresolved == [Attempt(sent, FALLBACK, 1_234)]
        assert await resolve(restarted.summary(None, None)) == (1, 250, 0, 0)
        assert await accept(restarted, *settled) == Acceptance.DUPLICATE
    run(deployment_settings, scenario)


def test_one_health_poll_per_interval_across_instances(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        boards = [(await deployment.start(name)).health for name in ("a", "b", "c")]
        turns: list[float] = []
        deadline = time.monotonic() + 3.5 * HEALTH_INTERVAL_MS / 1000
        while time.monotonic() < deadline:
            for board in boards:
                turn = await resolve(board.claim_poll(HEALTH_INTERVAL_MS))
                if turn is not None:
                    turns.append(time.monotonic())
            await asyncio.sleep(0.005)
        assert 3 <= len(turns) <= 4, turns
        gaps = [later - earlier for earlier, later in zip(turns, turns[1:])]
        assert min(gaps) >= HEALTH_INTERVAL_MS / 1000 - 0.01, gaps
    run(deployment_settings, scenario)


def test_a_new_poller_keeps_the_schedule_of_the_one_before(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        first = (await deployment.start("a")).health
        assert await resolve(first.claim_poll(HEALTH_INTERVAL_MS)) is not None
        polled = time.monotonic()
        await deployment.stop("a")  # the poller goes, its turn does not restart
        second = (await deployment.start("b")).health
        assert await resolve(second.claim_poll(HEALTH_INTERVAL_MS)) is None
        await asyncio.sleep(polled + HEALTH_INTERVAL_MS / 1000 + 0.05 - time.monotonic())
        assert await resolve(second.claim_poll(HEALTH_INTERVAL_MS)) is not None
    run(deployment_settings, scenario)


def test_published_health_reaches_every_instance_once(deployment_settings):
    async def scenario(deployment: Deployment) -> None:
        poller, reader = (await deployment.start("a")).health, (await deployment.start("b")).health
        await resolve(reader.latest())  # whatever was there before
        observed_at = time.monotonic() * 1000
        await resolve(poller.publish({"default": {"failing": True, "minResponseTime": 0,
                                                  "observedAt": observed_at}}))
        await resolve(poller.publish({"fallback": {"failing": False, "minResponseTime": 40,
                                                   "observedAt": observed_at}}))
        reports = await resolve(reader.latest())
        assert reports is not None
        assert reports["default"]["failing"] is True
        assert reports["fallback"]["minResponseTime"] == 40
        for report in reports.values():
            # Another host's clock may be read into this one's: a few ms of slack.
            assert abs(report["observedAt"] - observed_at) < 50
        assert await resolve(reader.latest()) is None
    run(deployment_settings, scenario)
