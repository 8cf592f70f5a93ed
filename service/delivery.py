"""The worker side: take payments from the queue, route, send, settle in the ledger.

A payment leaves the queue only when a processor is usable and an in-flight
slot is free, so while both processors fail the payments wait in the ring
(C memory), not in tasks. Each attempt ends one of three ways:

- recorded (200, or 422: the processor already holds it): into the ledger at
  once, under that processor, with the requestedAt it holds;
- stored nothing (5xx, 429, no connection): back to the front of the queue;
- unknown (timeout, connection lost): the payment is pinned to that processor.
  It is sent there again with the same requestedAt until it gets a definite
  answer (a processor answers 422 for what it already holds), and may go
  elsewhere only after that processor, asked with GET /payments/{id} once no
  attempt can still be running, says it does not hold it. So no payment is
  ever held by both processors.

Every send is recorded in the store before the request leaves, and every
outcome settled there, so whoever resumes a payment (this instance after a
restart, or, with a shared store, another instance after this one died)
knows which payments to ask the processors about (resolve_after_restart).
"""
from __future__ import annotations

import asyncio
import logging
import time
from time import perf_counter

from paycore.core.ring_queue import RingQueue

from .metrics import Metrics
from .payment import Attempt, Payment
from .processor_client import Outcome, ProcessorClient, ProcessorError
from .router import PROCESSOR_NAMES, Router
from .store.base import Deferred, Store, resolve
from .turn_budget import TurnBudget

log = logging.getLogger("paycore.delivery")

# Payments are taken off the queue on a later turn of the event loop than the
# one that accepted them. The 202 has just been written, and the kernel tends
# to wake its reader (the load balancer) on this CPU, where it runs only once
# this process blocks: sending at once would keep the answer waiting behind
# the send (README, Performance: POST p99 0.69 -> 0.58 ms, 60 s ramps side by
# side). A timer is what lets the loop block first; call_soon runs before the
# loop polls again.
HAND_OFF_DELAY_S = 0.001
# A pass over the queue hands payments out for at most this long before the
# loop gets its turn back: answers never wait long behind a backlog's flush
# (when a processor comes back to thousands of queued payments), and the
# sends started in one slice are few enough to start together.
PASS_SLICE_S = 0.0002
# Requests started per turn of the loop, at most: a send and its answer cost
# tens of microseconds each, so a turn stays well under a millisecond however
# many sends a batch of the journal releases at once.
SENDS_PER_TURN = 4

RETRY_KINDS = ("requeued", "pinned_resend", "resumed_unsent", "resumed_unresolved")
REQUEUED, PINNED_RESEND, RESUMED_UNSENT, RESUMED_UNRESOLVED = range(len(RETRY_KINDS))
# An outcome's position among the outcome labels.
OUTCOME_INDEX = {outcome: index for index, outcome in enumerate(Outcome)}


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Dispatcher:
    def __init__(self, queue: RingQueue, router: Router,
                 clients: tuple[ProcessorClient, ProcessorClient], store: Store,
                 metrics: Metrics, *, max_in_flight: int, retry_min_ms: int,
                 retry_max_ms: int, pin_release_ms: int) -> None:
        self._queue = queue
        self._router = router
        self._clients = clients
        self._store = store
        self._outcomes = metrics.counter_family(
            "paycore_processor_outcomes_total",
            "Payment requests sent to a processor, by how they ended: ok (200), 422 (already "
            "held), 5xx, 429, 4xx, unreachable (never sent), timeout (unknown outcome).",
            {"processor": PROCESSOR_NAMES, "outcome": [outcome.value for outcome in Outcome]})
        self._retries = metrics.counter_family(
            "paycore_payment_retries_total",
            "Payments tried again: requeued after an attempt that stored nothing (or a pinned "
            "payment its processor does not hold), resends of pinned payments (unknown "
            "outcome), and payments resumed from the journal at start.", {"kind": RETRY_KINDS})
        self._max_in_flight = max_in_flight
        self._retry_min_s = retry_min_ms / 1000
        self._retry_max_s = retry_max_ms / 1000
        self._pin_release_ms = pin_release_ms
        self._in_flight = 0
        self._send_turns = TurnBudget(SENDS_PER_TURN)
        self._probing = False
        self._wakeup: asyncio.Future | None = None
        self._hand_off: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._pinned: set[asyncio.Task] = set()
        self._running_loop: asyncio.AbstractEventLoop | None = None
        metrics.register_gauge(
            "paycore_payments_in_flight", "gauge",
            "Payments taken from the queue whose attempt has not ended (at most PAYCORE_MAX_IN_FLIGHT).",
            lambda: self.in_flight)
        metrics.register_gauge(
            "paycore_payments_unresolved", "gauge",
            "Payments worked on outside the queue: pinned after an unknown outcome, "
            "being looked up after a restart, or waiting for room in the queue.",
            lambda: self.unresolved)

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: asyncio.get_running_loop() makes a getpid() system call
        # each time (a fork check), and notify() runs for every payment.
        if self._running_loop is None:
            self._running_loop = asyncio.get_running_loop()
        return self._running_loop

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def unresolved(self) -> int:
        """Payments pinned to a processor after an unknown outcome."""
        return len(self._pinned)

    def start(self) -> None:
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        if self._hand_off is not None:
            self._hand_off.cancel()
        tasks = [task for task in (self._task, *self._pinned) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def notify(self) -> None:
        """Something changed (a payment queued, a slot freed): let the loop look
        again, a turn of the event loop later (HAND_OFF_DELAY_S). With the
        queue empty there is nothing to look at (whoever queues a payment
        notifies after it): a slot freed by each settlement would otherwise
        cost the loop a timer's wake-up per payment."""
        if self._hand_off is None and len(self._queue):
            self._hand_off = self._loop.call_later(HAND_OFF_DELAY_S, self._wake)

    def _wake(self) -> None:
        self._hand_off = None
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep_until_notified(self) -> None:
        self._wakeup = self._loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _run(self) -> None:
        backoff_s = self._retry_min_s
        slice_ends = perf_counter() + PASS_SLICE_S
        while True:
            if (len(self._queue) == 0 or self._in_flight >= self._max_in_flight or self._probing
                    or self._in_flight + len(self._pinned) >= self._store.settlement_room):
                # Before yielding, the sends just taken end their batch, so their
                # tasks find them written and need no later pass (a store may
                # let them wait for an answer's batch instead: flush_waiting).
                self._store.flush_waiting()
                await self._sleep_until_notified()
                slice_ends = perf_counter() + PASS_SLICE_S
                continue
            if perf_counter() >= slice_ends:
                self._store.flush_waiting()
                await asyncio.sleep(0)
                slice_ends = perf_counter() + PASS_SLICE_S
                continue
            processor = self._router.choose()
            if processor is None:
                # Both failing: wait (new payments must not cut the wait short,
                # or every one of them would become a probe), then let a single
                # payment test the water.
                self._store.flush_waiting()
                await asyncio.sleep(backoff_s)
                processor = self._router.choose()
                if processor is None:
                    processor = self._router.probe_target()
                    self._probing = True
                    backoff_s = self._longer(backoff_s)
            else:
                backoff_s = self._retry_min_s
            popped = self._queue.pop()
            if popped is None:
                self._probing = False
                continue
            attempt = Attempt(Payment(*popped), processor, wall_clock_ms())
            recorded = self._store.sending(attempt)
            self._in_flight += 1
            self._loop.create_task(self._deliver(attempt, self._probing, recorded))

    async def _deliver(self, attempt: Attempt, probe: bool, recorded: Deferred[bool]) -> None:
        try:
            outcome = await self._send_once_recorded(recorded, attempt)
        finally:
            self._in_flight -= 1
            if probe:
                self._probing = False
        if outcome is Outcome.UNKNOWN:
            self._hold(self._settle_unknown(attempt))
        elif outcome is not None and outcome.stored_nothing:
            self._requeue(attempt.payment)
        self.notify()

    async def _send_once_recorded(self, recorded: Deferred[bool], attempt: Attempt) -> Outcome | None:
        """The attempt, once the store has the send; None: the payment is not
        this instance's to send (another one took it over, or it was paid
        before)."""
        try:
            ours = await resolve(recorded)
        except ConnectionError as error:
            log.warning("store unavailable, a payment waits: %r", error)
            # Holding the in-flight slot meanwhile keeps payments from cycling.
            await asyncio.sleep(self._retry_max_s)
            return Outcome.NOT_SENT
        if not ours:
            return None
        return await self._attempt(attempt)

    async def _attempt(self, attempt: Attempt) -> Outcome:
        await self._send_turns.take()
        processor = attempt.processor
        ticket = self._router.start(processor)
        outcome = await self._clients[processor].send_payment(
            attempt.payment.correlation_id, attempt.payment.cents, attempt.requested_at_ms)
        self._router.end(processor, ticket, outcome)
        self._outcomes[processor][OUTCOME_INDEX[outcome]] += 1
        if outcome is Outcome.PROCESSED:
            self._store.settle(attempt)
        elif outcome is Outcome.ALREADY_HELD:
            await self._record_held(attempt)
        return outcome

    async def _record_held(self, attempt: Attempt) -> None:
        """A 422: record it under the requestedAt the processor holds, which is
        ours unless an attempt given up on long ago landed after all."""
        try:
            held = await self._clients[attempt.processor].find_payment(attempt.payment.correlation_id)
        except ProcessorError:
            held = None
        self._store.settle(attempt if held is None else attempt._replace(requested_at_ms=held.requested_at_ms))

    async def _settle_unknown(self, attempt: Attempt) -> None:
        processor = attempt.processor
        client = self._clients[processor]
        last_sent_ms = time.monotonic() * 1000
        backoff_s = self._retry_min_s
        while True:
            await asyncio.sleep(backoff_s)
            backoff_s = self._longer(backoff_s)
            if self._router.usable(processor):
                self._retries[PINNED_RESEND] += 1
                outcome = await self._attempt(attempt)
                if outcome.recorded:
                    return
                if outcome is not Outcome.NOT_SENT:
                    last_sent_ms = time.monotonic() * 1000
                continue
            if time.monotonic() * 1000 - last_sent_ms < self._pin_release_ms:
                continue
            try:
                held = await client.find_payment(attempt.payment.correlation_id)
            except ProcessorError:
                continue
            if held is not None:
                self._store.settle(attempt._replace(requested_at_ms=held.requested_at_ms))
            else:
                self._requeue(attempt.payment)
                self.notify()
            return

    def resume(self, unsent: list[Payment], unresolved: list[Attempt]) -> None:
        """Take over what a previous run of this instance, or a dead instance, left."""
        self._retries[RESUMED_UNSENT] += len(unsent)
        self._retries[RESUMED_UNRESOLVED] += len(unresolved)
        for payment in unsent:
            if not self._queue.push(payment.correlation_id, payment.cents):
                self._hold(self._requeue_when_room(payment))
        for attempt in unresolved:
            self._hold(self._resolve_after_restart(attempt))
        self.notify()

    async def _resolve_after_restart(self, attempt: Attempt) -> None:
        """A send whose outcome died with the previous process: ask both
        processors first. Not held anywhere yet, it may still be on its way
        to where it was last sent, so it stays pinned there (same requestedAt,
        which that processor will not take twice)."""
        backoff_s = self._retry_min_s
        while True:
            try:
                held = [await client.find_payment(attempt.payment.correlation_id) for client in self._clients]
                break
            except ProcessorError:
                await asyncio.sleep(backoff_s)
                backoff_s = self._longer(backoff_s)
        for holder, payment in enumerate(held):
            if payment is not None:
                self._store.settle(Attempt(attempt.payment, holder, payment.requested_at_ms))
                return
        await self._settle_unknown(attempt)

    def _longer(self, backoff_s: float) -> float:
        """The next wait of an exponential backoff, capped at PAYCORE_RETRY_MAX_MS."""
        return min(backoff_s * 2, self._retry_max_s)

    def _requeue(self, payment: Payment) -> None:
        self._retries[REQUEUED] += 1
        if not self._queue.push_front(payment.correlation_id, payment.cents):
            # Only possible when new payments filled the ring meanwhile: hold
            # this one in a task until there is room again; it is never dropped.
            self._hold(self._requeue_when_room(payment))

    def _hold(self, work) -> None:
        """Run a payment's work outside the queue, counted as unresolved until it ends."""
        task = self._loop.create_task(work)
        self._pinned.add(task)
        task.add_done_callback(self._pinned.discard)

    async def _requeue_when_room(self, payment: Payment) -> None:
        while not self._queue.push_front(payment.correlation_id, payment.cents):
            await asyncio.sleep(self._retry_min_s)
        self.notify()
