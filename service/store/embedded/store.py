"""The default store: the instances of one host share memory-mapped files on
tmpfs (the accepted ids of the idempotency window, the ledger's uncommitted
tail, the health board) and a payments record on disk (SQLite); each instance
keeps its own journal of what it promised, tried and learnt (journal.py),
replayed at its next start (recovery.py). No server to run.

The path of a payment through it:
- accept: the id is claimed in the shared table (not yet durable: no other
  instance answers "already accepted" for it meanwhile), the payment queued
  and journaled; once the journal holds it the claim is confirmed and the
  answer leaves.
- sending: the send is journaled and the payments record asked whether the
  id was paid before, at any age (an id past the window is claimed anew);
  the request leaves once both are known. A record in memory answers at
  once; one on disk through its reader thread, all of a turn's sends in one
  lookup.
- settle: journaled, and published at once in this instance's ledger tail
  (so summaries count it); once durable in the journal it goes to the
  payments record, which commits it in batches and then lets the tail and
  the journal drop it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paycore.core.accepted_ids import CLAIMED, CONFLICT, DUPLICATE, IN_PROGRESS, AcceptedIds
from paycore.core.journal import Journal
from paycore.core.ledger_tail import LedgerTail
from paycore.core.ring_queue import RingQueue

from ...config import Settings
from ...payment import Attempt, Payment
from ..base import Acceptance, Deferred, PaymentStatus, PendingWork, Totals, then
from .health_board import FileHealthBoard
from .journal import JournalWriter, start_journal_writer
from .recovery import recover
from .record import PaymentsRecord, RangeRead, Settlement

if TYPE_CHECKING:
    from ...metrics import Metrics

log = logging.getLogger("paycore.store")

_ACCEPTANCE = {DUPLICATE: Acceptance.DUPLICATE, CONFLICT: Acceptance.CONFLICT}
# A claim another instance has not made durable yet is looked at again this
# often, for at most this long (its journal write waits for a slow disk).
CLAIM_POLL_S = 0.001
CLAIM_WAIT_S = 2.0
# The payments record is told how far the journal is durable at least this
# often when no settlement rides along (so it lets old segments go).
RECORD_PROGRESS_S = 0.1
RECORD_FILE = "payments.db"


class EmbeddedStore:
    def __init__(self, settings: Settings) -> None:
        os.makedirs(settings.shared_dir, exist_ok=True)
        os.makedirs(settings.data_dir, exist_ok=True)
        self._settings = settings
        self._journal_directory = os.path.join(settings.data_dir, f"journal-{settings.instance}")
        self.ids = AcceptedIds(os.path.join(settings.shared_dir, "accepted-ids.shm"), settings.instance,
                               settings.idempotency_capacity, settings.idempotency_window_s * 1000)
        self.tail = LedgerTail(settings.shared_dir, settings.instance, settings.ledger_tail_capacity)
        self.record = PaymentsRecord(os.path.join(settings.data_dir, RECORD_FILE), settings.instance,
                                     settings.shared_dir, sync=settings.journal_sync,
                                     retention_days=settings.retention_days)
        self.health = FileHealthBoard(settings.shared_dir)
        self.journal: JournalWriter | None = None
        self.promised = 0  # the journal sequence number of the last acceptance
        self._queue: RingQueue | None = None
        self._work: PendingWork | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Settled, not yet handed to the record: handed once the journal holds them.
        self._settlements: list[Settlement] = []
        self._reported_seq = 0
        self._progress: asyncio.TimerHandle | None = None
        # Pre-send checks asked in this turn of the loop: one lookup for all.
        self._checks: dict[bytes, asyncio.Future] = {}
        # Summaries read in this turn since the last settlement, by range.
        self._summaries: dict[tuple[int | None, int | None], asyncio.Future] = {}

    async def start(self, queue: RingQueue, work: PendingWork) -> None:
        self._loop = asyncio.get_running_loop()
        self.record.open()
        journal = Journal(self._journal_directory, self._settings.journal_sync,
                          self._settings.journal_segment_bytes)
        resumed = recover(journal, self.record, self.tail, self.ids)
        journal.keep_pending_ids(self.ids)
        self._reported_seq = journal.durable_seq
        self.journal = start_journal_writer(journal, self._journal_durable, self._settings.journal_spin_us)
        self.record.start(self._loop, self._record_committed)
        for payment in resumed.already_paid:
            self.journal.discarded(payment)
        self._queue = queue
        self._work = work
        work.resume(resumed.unsent, resumed.unresolved)

    def register_metrics(self, metrics: Metrics) -> None:
        """After start (the journal exists from then on)."""
        self.journal.register_metrics(metrics)
        ids, tail = self.ids, self.tail
        metrics.register_gauge("paycore_accepted_ids_live", "gauge",
                               "Slots taken in the live epochs of the accepted-id table this host's "
                               "instances share (approximate).", lambda: ids.live_ids)
        metrics.register_gauge("paycore_accepted_ids_window_seconds", "gauge",
                               "How far back every accepted correlationId is still known; below "
                               "PAYCORE_IDEMPOTENCY_WINDOW_S while epochs end early.",
                               lambda: ids.effective_window_ms / 1000)
        metrics.register_gauge("paycore_accepted_ids_early_advances_total", "counter",
                               "Epochs of the accepted-id table begun early because the previous one "
                               "was full: traffic above PAYCORE_IDEMPOTENCY_CAPACITY per window.",
                               lambda: ids.early_advances)
        metrics.register_gauge("paycore_ledger_tail_entries", "gauge",
                               "Settlements this instance published for summaries that the payments "
                               "record has not committed yet.", lambda: len(tail))
        metrics.register_gauge("paycore_ledger_tail_room", "gauge",
                               "Settlements this instance's ledger tail can still take: payments in "
                               "flight never outnumber it (the dispatcher waits for the payments record).",
                               lambda: tail.room)

    # --- accepting ---------------------------------------------------------------------

    def accept(self, payment: Payment) -> Acceptance | asyncio.Future:
        acceptance = self._claim(payment)
        if acceptance is not None:
            return acceptance
        answer = self._loop.create_future()
        self._loop.call_later(CLAIM_POLL_S, self._claim_again, payment, answer,
                              self._loop.time() + CLAIM_WAIT_S)
        return answer

    def _claim(self, payment: Payment) -> Acceptance | None:
        """The answer, or None while another instance's claim of the same id
        is not durable yet."""
        # Checked before the claim, so a claimed payment always fits the queue.
        if self._queue.is_full:
            return Acceptance.QUEUE_FULL
        claim = self.ids.claim(payment.correlation_id, payment.cents)
        if claim == CLAIMED:
            self._queue.push(payment.correlation_id, payment.cents)
            self.promised = self.journal.accepted(payment)
            # Before the answer, which the caller queues after this.
            self.journal.after_durable(self.promised, self.ids.confirm, payment.correlation_id)
            self._work.notify()
            return Acceptance.ACCEPTED
        if claim == IN_PROGRESS:
            return None
        return _ACCEPTANCE[claim]

    def _claim_again(self, payment: Payment, answer: asyncio.Future, deadline: float) -> None:
        """The other instance's answer decides this one's, once its claim is
        durable (or given up: then this one may claim)."""
        if answer.done():
            return
        acceptance = self._claim(payment)
        if acceptance is None and self._loop.time() < deadline:
            self._loop.call_later(CLAIM_POLL_S, self._claim_again, payment, answer, deadline)
            return
        if acceptance is Acceptance.ACCEPTED:
            # Answered later than the request was read: the answer waits here.
            self.journal.after_durable(self.promised, answer.set_result, acceptance)
        else:
            answer.set_result(Acceptance.BUSY if acceptance is None else acceptance)

    def after_durable(self, promise: int, callback: Callable[..., Any], *args: Any) -> None:
        self.journal.after_durable(promise, callback, *args)

    def flush_waiting(self) -> None:
        self.journal.flush_waiting()

    # --- sending and settling -------------------------------------------------------------

    def sending(self, attempt: Attempt) -> Deferred[bool]:
        self.journal.sending(attempt)
        journaled = self.journal.durable()
        held = self.record.holds_now(attempt.payment.correlation_id)
        if held is None:
            return self._sending_once_checked(attempt, journaled)
        if held:
            self._paid_before(attempt.payment)
            return False
        # The journal's future itself: written by the time the send's task
        # first runs, it lets the send go on in that turn.
        return journaled

    def _sending_once_checked(self, attempt: Attempt, journaled: asyncio.Future) -> asyncio.Future:
        """Ours to send once the journal holds the send and the payments
        record, asked off the loop, does not hold the payment."""
        correlation_id = attempt.payment.correlation_id
        if not self._checks:
            self._loop.call_soon(self._check_paid_before)
        checked = self._checks.get(correlation_id)
        if checked is None:
            checked = self._checks[correlation_id] = self._loop.create_future()
        ours = self._loop.create_future()

        def decide(_: asyncio.Future) -> None:
            if not journaled.done() or not checked.done() or ours.done():
                return
            error = checked.exception()
            if error is not None:
                ours.set_exception(error)
            elif checked.result():
                self._paid_before(attempt.payment)
                ours.set_result(False)
            else:
                ours.set_result(True)

        journaled.add_done_callback(decide)
        checked.add_done_callback(decide)
        return ours

    def _paid_before(self, payment: Payment) -> None:
        log.info("payment %s was paid before: not sent again", payment.correlation_id.hex())
        self.journal.discarded(payment)

    def _check_paid_before(self) -> None:
        """One lookup in the payments record for every send of this turn: a
        correlationId paid before, at any age, is never sent again."""
        checks, self._checks = self._checks, {}
        lookup = self.record.lookup(list(checks))

        def answer(done: asyncio.Future) -> None:
            error = done.exception()
            for correlation_id, checked in checks.items():
                if error is not None:
                    checked.set_exception(ConnectionError(f"payments record unavailable: {error!r}"))
                else:
                    checked.set_result(correlation_id in done.result())

        lookup.add_done_callback(answer)

    def settle(self, attempt: Attempt) -> None:
        self._summaries.clear()  # a summary asked from now on counts this one
        generation = self.tail.generation
        seq = self.journal.settled(attempt, generation)
        payment = attempt.payment
        if not self.tail.append(seq, generation, attempt.processor, attempt.requested_at_ms, payment.cents):
            log.error("ledger tail full: payment %s counts in summaries once the record has it",
                      payment.correlation_id.hex())
        self._settlements.append(Settlement(
            correlation_id=payment.correlation_id, cents=payment.cents, processor=attempt.processor,
            requested_at_ms=attempt.requested_at_ms, generation=generation, journal_seq=seq))

    @property
    def settlement_room(self) -> int:
        return self.tail.room

    def _journal_durable(self, durable_seq: int) -> None:
        """Hand the settlements the journal now holds to the payments record."""
        settlements = self._settlements
        ready = 0
        while ready < len(settlements) and settlements[ready].journal_seq <= durable_seq:
            ready += 1
        if ready:
            self.record.submit(settlements[:ready], durable_seq)
            del settlements[:ready]
            self._reported_seq = durable_seq
        elif self._progress is None and durable_seq > self._reported_seq:
            self._progress = self._loop.call_later(RECORD_PROGRESS_S, self._report_progress)

    def _report_progress(self) -> None:
        self._progress = None
        durable_seq = self.journal.journal.durable_seq
        unsubmitted = self._settlements[0].journal_seq - 1 if self._settlements else durable_seq
        through = min(durable_seq, unsubmitted)
        if through > self._reported_seq:
            self.record.submit([], through)
            self._reported_seq = through

    def _record_committed(self, committed_seq: int) -> None:
        self.tail.release_through(committed_seq)
        self.journal.committed(committed_seq)
        self._work.notify()  # the tail has room again, should the dispatcher wait for it

    # --- reading -------------------------------------------------------------------------

    def summary(self, from_ms: int | None, to_ms: int | None) -> asyncio.Future:
        """Summaries of one range asked between two settlements of this
        instance, in one turn of the loop, share one read: a client pipelining
        thousands of them holds one snapshot and one query, not thousands."""
        key = (from_ms, to_ms)
        shared = self._summaries.get(key)
        if shared is None:
            if not self._summaries:
                self._loop.call_soon(self._summaries.clear)
            shared = self._summaries[key] = self._read_summary(from_ms, to_ms)
        return shared

    def _read_summary(self, from_ms: int | None, to_ms: int | None) -> asyncio.Future:
        # The tail first: what the record commits meanwhile is then in its snapshot.
        tail = self.tail.snapshot()
        generation = self.tail.generation

        def add_tail(reads: list[RangeRead]) -> Totals:
            sums = [0, 0, 0, 0]
            for read in reads:
                for part in (read.totals, *(tail.totals(read.committed, generation, first, last)
                                            for first, last in read.ranges)):
                    sums = [a + b for a, b in zip(sums, part)]
            return tuple(sums)

        return then(self.record.summary(generation, from_ms, to_ms), add_tail)

    def lookup(self, correlation_id: bytes) -> asyncio.Future:
        def answer(settled_ones: dict[bytes, Attempt]) -> PaymentStatus | None:
            settled = settled_ones.get(correlation_id)
            if settled is not None:
                return PaymentStatus(settled.payment, settled)
            accepted = self.ids.state(correlation_id)
            return None if accepted is None else PaymentStatus(Payment(correlation_id, accepted[1]), None)

        return then(self.record.lookup([correlation_id]), answer)

    def purge(self) -> asyncio.Future:
        """Every instance's ledger starts over: a new generation, durable in
        the record before any instance counts in it."""
        return then(self.record.purge(), self._start_generation)

    def _start_generation(self, generation: int) -> None:
        self._summaries.clear()
        self.tail.raise_generation(generation)

    async def close(self) -> None:
        if self._progress is not None:
            self._progress.cancel()
        if self.journal is not None:
            self.journal.close()
            self._journal_durable(self.journal.journal.durable_seq)
            self._report_progress()
        await self.record.close()
        self.health.close()
        self.tail.close()
        self.ids.close()
