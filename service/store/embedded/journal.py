"""Group commit off the event loop: what the service promises or attempts is
journaled before it leaves the process, and the loop never waits for a disk.

The loop appends records to the journal's open batch and ends the batch at
the end of each read (a connection's requests) or pass of the dispatcher
(`flush`); a callback scheduled at the first append is the safety net. Only
once the batch is durable do the answers that promised those payments go out
(`after_durable`) and the sends that were recorded start (`durable`).

Who writes the batch depends on where the journal lives:
- on a disk (ThreadedJournalWriter): a writer thread writes (and, with
  PAYCORE_JOURNAL_SYNC=1, syncs) each batch without the GIL and signals the
  loop through an eventfd. A slow or failing disk delays only what waits on
  it: a failed write is retried until it succeeds, and nothing is promised
  or sent that the journal does not hold.
- in memory, tmpfs (LoopJournalWriter): the loop writes the batch itself. A
  write there is a copy that never waits for a device, and costs less than
  the two thread wake-ups of a hand-off.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paycore.core.journal import Journal

from ...os_threads import start_named_thread
from ...payment import Attempt, Payment

if TYPE_CHECKING:
    from ...metrics import Metrics

log = logging.getLogger("paycore.journal")

WRITER_STOP_TIMEOUT_S = 10.0
# A journal written on the loop: its by-the-clock work, and a failed write tried again.
MAINTAIN_INTERVAL_S = 1.0
RETRY_AFTER_ERROR_S = 0.05
# Newer observations of how long the writer takes count this much.
LATENCY_SMOOTHING = 1 / 8


def start_journal_writer(journal: Journal, on_durable: Callable[[int], None], spin_us: int = 0) -> JournalWriter:
    """The writer that suits where the journal lives (journal: recovered, not
    yet served). on_durable(seq) runs on the loop each time every record up to
    seq is durable."""
    if journal.in_memory:
        return LoopJournalWriter(journal, on_durable)
    return ThreadedJournalWriter(journal, on_durable, spin_us)


class JournalWriter:
    """What the loop appends, and what waits until it is durable."""

    # How long sends, settlements and discards may wait for a batch to end
    # before one is ended for them alone (they ride along with any answer's),
    # and how many may wait: what a batch releases runs in one turn of the loop.
    deferred_flush_s = 0.0
    DEFERRED_RECORDS_MAX = 64

    def __init__(self, journal: Journal, on_durable: Callable[[int], None]) -> None:
        self._journal = journal
        self._on_durable = on_durable
        self._loop = asyncio.get_running_loop()
        # (sequence number, callback, args): released once durable_seq reaches it.
        self._waiting: deque[tuple[int, Callable[..., Any], tuple[Any, ...]]] = deque()
        # (sequence number, future): the same for sends.
        self._batches: deque[tuple[int, asyncio.Future]] = deque()
        self._durable_seq = journal.durable_seq
        self._nothing_to_wait_for = self._loop.create_future()
        self._nothing_to_wait_for.set_result(True)
        self._scheduled_flush: asyncio.Handle | None = None
        self._deferred_flush: asyncio.TimerHandle | None = None
        self._deferred_records = 0
        self._reported_error = 0

    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def backlog(self) -> int:
        """Records appended and not yet durable."""
        return self._journal.appended_seq - self._durable_seq

    def register_metrics(self, metrics: Metrics) -> None:
        journal = self._journal
        metrics.register_gauge("paycore_journal_backlog_records", "gauge",
                               "Journal records appended and not yet durable.", lambda: self.backlog)
        metrics.register_gauge("paycore_journal_batches_total", "counter",
                               "Journal writes (group commits).", lambda: journal.batches_written)
        metrics.register_gauge("paycore_journal_records_total", "counter",
                               "Journal records written.", lambda: journal.records_written)
        metrics.register_gauge("paycore_journal_uncommitted_records", "gauge",
                               "Durable journal records past the payments record's last commit "
                               "(durable_seq - committed_seq): how far the record trails the journal, "
                               "whose segments stay until it catches up.",
                               lambda: journal.durable_seq - journal.committed_seq)
        metrics.register_gauge("paycore_journal_write_errno", "gauge",
                               "errno of the journal's last failed write, 0 once a write succeeds; "
                               "while it is not 0, what waits for the journal waits.",
                               lambda: journal.error)

    def accepted(self, payment: Payment) -> int:
        """The record's sequence number: what an answer promising it waits for."""
        seq = self._journal.accepted(payment.correlation_id, payment.cents)
        self._schedule_flush()
        return seq

    def sending(self, attempt: Attempt) -> None:
        self._journal.sending(attempt.payment.correlation_id, attempt.processor, attempt.requested_at_ms)
        self._defer_flush()

    def settled(self, attempt: Attempt, generation: int) -> int:
        """The settlement's sequence number: it rides with the next batch."""
        seq = self._journal.settled(attempt.payment.correlation_id, attempt.processor,
                                    attempt.requested_at_ms, attempt.payment.cents, generation)
        self._defer_flush()
        return seq

    def discarded(self, payment: Payment) -> None:
        self._journal.discarded(payment.correlation_id)
        self._defer_flush()

    def after_durable(self, seq: int, callback: Callable[..., Any], *args: Any) -> None:
        """callback(*args) once every record up to seq is durable: at once if
        it is. Released in the order given: a callback given after one that
        waits for a later batch waits for that batch too (a batch or two)."""
        if seq <= self._durable_seq:
            callback(*args)
        else:
            self._waiting.append((seq, callback, args))

    def durable(self) -> asyncio.Future:
        """A future of True once every record appended so far is durable."""
        seq = self._journal.appended_seq
        if seq <= self._durable_seq:
            return self._nothing_to_wait_for
        if self._batches and self._batches[-1][0] == seq:
            return self._batches[-1][1]
        future = self._loop.create_future()
        self._batches.append((seq, future))
        return future

    def committed(self, seq: int) -> None:
        """The payments record holds every settlement up to seq: the segments
        before it may go."""
        self._journal.committed_seq = seq

    def flush(self) -> None:
        """End the open batch: at the end of a read or a dispatcher pass, so
        what it promises leaves as soon as it is durable."""
        raise NotImplementedError

    def flush_waiting(self) -> None:
        """End the batch if something appended since the last flush is not
        to be deferred (deferred_flush_s)."""
        if self._scheduled_flush is not None:
            self.flush()

    def close(self) -> None:
        """Write what was appended and release the files."""
        raise NotImplementedError

    def _schedule_flush(self) -> None:
        if self._scheduled_flush is None:
            self._scheduled_flush = self._loop.call_soon(self.flush)

    def _defer_flush(self) -> None:
        self._deferred_records += 1
        if not self.deferred_flush_s or self._deferred_records >= self.DEFERRED_RECORDS_MAX:
            self._schedule_flush()
        elif self._deferred_flush is None:
            self._deferred_flush = self._loop.call_later(self.deferred_flush_s, self.flush)

    def _unschedule_flush(self) -> None:
        self._deferred_records = 0
        if self._scheduled_flush is not None:
            self._scheduled_flush.cancel()
            self._scheduled_flush = None
        if self._deferred_flush is not None:
            self._deferred_flush.cancel()
            self._deferred_flush = None

    def _release(self, durable: int) -> None:
        if durable <= self._durable_seq:
            return
        self._durable_seq = durable
        batches = self._batches
        while batches and batches[0][0] <= durable:
            future = batches.popleft()[1]
            if not future.done():
                future.set_result(True)
        waiting = self._waiting
        while waiting and waiting[0][0] <= durable:
            _, callback, args = waiting.popleft()
            callback(*args)
        self._on_durable(durable)

    def _report_error(self, error: int) -> None:
        if error != self._reported_error:
            if error:
                log.error("journal write failed, retrying: %s (%d records wait)",
                          os.strerror(error), self.backlog)
            else:
                log.warning("journal writes succeed again")
            self._reported_error = error


class ThreadedJournalWriter(JournalWriter):
    """A journal on disk: written by a thread of its own.

    Each batch costs a sync (a device flush: about 0.25 ms on the disk the
    README measures), and an answer that arrives during one waits for it
    and then its own. Sends and settlements, whose latency no client sees,
    therefore wait for the next answer's batch (or deferred_flush_s): about
    one sync per payment instead of three."""

    deferred_flush_s = 0.01

    def __init__(self, journal: Journal, on_durable: Callable[[int], None], spin_us: int = 0) -> None:
        """spin_us: after handing a batch over, the loop may wait this long for
        the writer, without the GIL, instead of going back to its poll and
        being woken through the eventfd (two thread wake-ups, tens of µs on
        a VM). It does so only while writes usually finish within that time
        (a disk without sync), never for a slow disk."""
        super().__init__(journal, on_durable)
        self._spin_ns = spin_us * 1000
        self._spin: asyncio.Handle | None = None
        self._submitted_at_ns = 0      # when the oldest batch not yet durable was handed over
        self._write_ns = 0.0           # how long the writer usually takes
        self._loop.add_reader(journal.event_fd, self._written)
        self._thread = start_named_thread(journal.serve, "journal-writer")

    def flush(self) -> None:
        self._unschedule_flush()
        if self._journal.submit() and not self._submitted_at_ns:
            self._submitted_at_ns = time.monotonic_ns()
            if self._spin_ns and self._write_ns <= self._spin_ns and self._spin is None:
                # After this turn's other callbacks: their batches ride along.
                self._spin = self._loop.call_soon(self._wait_briefly)

    def _wait_briefly(self) -> None:
        self._spin = None
        if self._journal.wait_durable(self._journal.appended_seq, self._spin_ns):
            self._release(self._journal.durable_seq)

    def _written(self) -> None:
        journal = self._journal
        journal.drain_event()
        self._report_error(journal.error)
        self._release(journal.durable_seq)

    def _release(self, durable: int) -> None:
        if durable <= self._durable_seq:
            return
        now_ns = time.monotonic_ns()
        self._write_ns += (now_ns - self._submitted_at_ns - self._write_ns) * LATENCY_SMOOTHING
        self._submitted_at_ns = now_ns if durable < self._journal.appended_seq else 0
        super()._release(durable)

    def close(self) -> None:
        """Write what was appended, stop the writer and release the files."""
        self.flush()
        self._journal.stop()
        self._thread.join(WRITER_STOP_TIMEOUT_S)
        self._loop.remove_reader(self._journal.event_fd)
        if self._thread.is_alive():
            log.error("the journal writer did not stop within %.0f s; %d records were not written",
                      WRITER_STOP_TIMEOUT_S, self.backlog)
            return
        self._written()
        self._journal.close()


class LoopJournalWriter(JournalWriter):
    """A journal in memory: written on the loop at the end of each batch."""

    def __init__(self, journal: Journal, on_durable: Callable[[int], None]) -> None:
        super().__init__(journal, on_durable)
        journal.open_here()
        self._retry: asyncio.TimerHandle | None = None
        self._maintenance = self._loop.call_later(MAINTAIN_INTERVAL_S, self._maintain)

    def flush(self) -> None:
        self._unschedule_flush()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        written = self._journal.write_here()
        self._report_error(self._journal.error)
        if written:
            self._release(self._journal.durable_seq)
        else:
            # Full tmpfs: the records stay appended; what waits for them waits.
            self._retry = self._loop.call_later(RETRY_AFTER_ERROR_S, self.flush)

    def _maintain(self) -> None:
        self._journal.maintain()
        self._maintenance = self._loop.call_later(MAINTAIN_INTERVAL_S, self._maintain)

    def close(self) -> None:
        self.flush()
        self._maintenance.cancel()
        if self._retry is not None:
            self._retry.cancel()
            log.error("closing with a journal that cannot be written: %d records were not written",
                      self.backlog)
        self._journal.close()
