"""The payments record: every settled payment on disk, once per correlationId,
and the aggregates that answer summaries over any range of history. One
SQLite file per host (record_sql.py has the schema), shared by every instance
of the host, each with its own connections.

A settlement reaches the record once its journal record is durable. The
instance's writer thread commits what was handed to it in groups (at most
every COMMIT_INTERVAL_S, sooner when COMMIT_AT_ONCE wait) together with the
instance's journal sequence they reach, counts what each commit inserted in
the host's recent ledger (paycore.core.recent_ledger: the last hour's
buckets in shared memory), then tells the event loop (`on_committed`), which
may then delete the journal segments below it and drop the settlements from
its ledger tail. The writer holds the GIL only to bind a statement's
parameters: statements bind many rows at once, so a commit takes the GIL back
a handful of times, whatever its size, and an event loop that holds it for
long stretches does not starve it.

A summary of a range that starts within the last hour is summed from the
recent ledger, with no statement but for a few milliseconds at an end older
than its 1 ms ring. Other reads, a lookup before every send and
the remaining summaries, are answered by a thread that never takes the GIL
(paycore.core.record_reader); reads that wait for no device are made on the
loop instead, as a journal in memory is written by the loop itself: in a
record in memory (tmpfs) the lookups before sends (`holds_now`) and every
summary; on a disk, the summaries of recent ranges (RECENT_SUMMARY_MS).

Before `start`, the synchronous calls serve recovery on the caller's thread,
on a connection of their own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any, NamedTuple

from paycore.core.recent_ledger import RecentLedger
from paycore.core.record_reader import InlineReads, LookupStatus, RecordReader

from ...os_threads import start_named_thread
from ...payment import Attempt, Payment
from ..base import Deferred, Totals, then
from . import record_sql
from .record_ranges import DAY_MS
from .record_sql import RecordError, Settlement

__all__ = ["PaymentsRecord", "RangeRead", "RecordError", "Settlement"]

log = logging.getLogger("paycore.record")

COMMIT_INTERVAL_S = 0.1
COMMIT_AT_ONCE = 4096            # settlements waiting that start a commit at once
RETRY_MIN_S, RETRY_MAX_S = 0.05, 2.0   # after a failed commit
RETENTION_CHECK_S = 60.0         # an idle writer looks at the day this often
RETENTION_SLICE_ROWS = 1000      # per table and level, per retention transaction
# With sync: commits are made durable together (one fdatasync of the WAL) this often.
SYNC_INTERVAL_S = 1.0
# A summary of a range that starts this recently reads pages written since:
# in the page cache, so read on the loop, without the reader thread's two
# wake-ups, even from a record on a disk.
RECENT_SUMMARY_MS = 3_600_000


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class RangeRead(NamedTuple):
    """The record's totals over some ranges of requestedAt (inclusive, None
    unbounded), and every instance's committed journal sequence as of the same
    read: settlements with a higher sequence are not in the totals."""
    ranges: tuple[tuple[int | None, int | None], ...]
    totals: Totals
    committed: dict[str, int]


class PaymentsRecord:
    def __init__(self, path: str, instance: str, recent_directory: str, *, sync: bool, retention_days: int = 0,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        """recent_directory: where the host's instances share the record's
        recent past (paycore.core.recent_ledger; a tmpfs). retention_days 0
        keeps every payment; otherwise payments (and their buckets) from
        before the day that many days back, by clock_ms, are deleted, a slice
        at a time between commits."""
        self.path = path
        self.recent_directory = recent_directory
        self.instance = instance
        self._sync = sync
        self._retention_days = retention_days
        self._clock_ms = clock_ms
        self._writer: _Writer | None = None
        self._recovery: sqlite3.Connection | None = None
        self._reads: _Reads | None = None
        self._recent: RecentLedger | None = None
        self._started = False

    def open(self) -> None:
        """Create the file and schema, or check them (RecordError if this
        version cannot use it)."""
        writing = record_sql.connect_writer(self.path)
        self._recent = RecentLedger(self.recent_directory, self.instance, self.path,
                                    record_sql.RECENT_REBUILD_STATEMENTS)
        self._writer = _Writer(writing, self.instance, self._recent, self._retention_days, self._clock_ms,
                               wal_path=self.path + "-wal" if self._sync else None)
        self._recovery = record_sql.connect_reader(self.path)
        self._reads = _Reads(self.path, self._recent, self._clock_ms)
        # Before the ledger tail drops what an earlier run left (recovery).
        self._recent.stale_unless(self.committed_seq())

    # Before start, on the caller's thread.

    def committed_seq(self) -> int:
        """This instance's last journal sequence whose settlements the record holds."""
        return record_sql.committed_seq(self._idle_reader(), self.instance)

    def generation(self) -> int:
        """The durable purge generation."""
        return record_sql.generation(self._idle_reader())

    def settled_among(self, correlation_ids: Sequence[bytes]) -> dict[bytes, Attempt]:
        return record_sql.settled_among(self._idle_reader(), correlation_ids)

    def settled_since(self, from_ms: int) -> Iterator[Payment]:
        return record_sql.settled_since(self._idle_reader(), from_ms)

    def record_recovered(self, settlements: Sequence[Settlement], through_seq: int) -> None:
        """Commit now what the journal replayed (correlationIds already held count nothing)."""
        self._idle_writer().commit_now(settlements, through_seq)

    # Running: called on the event loop's thread.

    def start(self, loop: asyncio.AbstractEventLoop, on_committed: Callable[[int], None]) -> None:
        """Start the writer and reader threads; on_committed(through_seq) runs
        on `loop` after each commit."""
        writer, recovery, reads = self._idle_writer(), self._recovery, self._reads
        assert recovery is not None and reads is not None
        self._started = True
        self._recovery = None
        recovery.close()
        writer.start(loop, on_committed)
        reads.start(loop)

    def submit(self, settlements: list[Settlement], through_seq: int) -> None:
        """Hand a batch to the writer: the instance's journal is durable
        through through_seq and these are its settlements not handed yet (an
        empty batch only moves the committed sequence). The list is the
        record's from then on: the caller must not change it."""
        self._running_writer().submit(settlements, through_seq)

    def lookup(self, correlation_ids: list[bytes]) -> asyncio.Future[dict[bytes, Attempt]]:
        """A future of the ids the record holds, at any age, as settled."""
        return self._running_reads().lookup(correlation_ids)

    def holds_now(self, correlation_id: bytes) -> bool | None:
        """Whether the record holds the id, answered at once when the record
        is in memory; None when it cannot be told without a wait (a record on
        a device, or a lock another connection holds): then ask lookup()."""
        return self._running_reads().holds_now(correlation_id)

    def summary(self, generation: int, from_ms: int | None, to_ms: int | None) -> Deferred[list[RangeRead]]:
        """The totals of `generation` (or a future of them) for requestedAt in
        [from_ms, to_ms] (inclusive, None unbounded), in reads that together
        cover the range once."""
        return self._running_reads().summary(generation, from_ms, to_ms)

    def purge(self) -> asyncio.Future[int]:
        """A future of a new purge generation, resolved once it is durable.
        Payments stay: a correlationId is never paid twice after a purge either."""
        return self._running_writer().purge()

    async def close(self) -> None:
        """Commit what was submitted, stop the threads, close the connections."""
        writer, recovery, reads, recent = self._writer, self._recovery, self._reads, self._recent
        self._writer = self._recovery = self._reads = self._recent = None
        if reads is not None:
            await reads.close()
        if recovery is not None:
            recovery.close()
        if writer is not None:
            await writer.close()
        if recent is not None:
            recent.close()

    def _idle_writer(self) -> _Writer:
        if self._writer is None or self._started:
            raise RuntimeError("payments record: not open, or already started")
        return self._writer

    def _idle_reader(self) -> sqlite3.Connection:
        if self._recovery is None or self._started:
            raise RuntimeError("payments record: not open, or already started")
        return self._recovery

    def _running_writer(self) -> _Writer:
        if self._writer is None or not self._started:
            raise RuntimeError("payments record: not started, or closed")
        return self._writer

    def _running_reads(self) -> _Reads:
        if self._reads is None or not self._started:
            raise RuntimeError("payments record: not started, or closed")
        return self._reads


class _Writer:
    """The instance's one writing connection and the thread that commits on it."""

    def __init__(self, connection: sqlite3.Connection, instance: str, recent: RecentLedger, retention_days: int,
                 clock_ms: Callable[[], int], wal_path: str | None) -> None:
        """wal_path: with sync, the WAL to make durable before a commit is
        reported (the journal then deletes what the commit holds); None:
        reported at once."""
        self._connection = connection
        self._wal = _DurableFile(wal_path) if wal_path else None
        self._instance = instance
        self._recent = recent
        self._retention_days = retention_days
        self._clock_ms = clock_ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_committed: Callable[[int], None] | None = None
        self._thread: threading.Thread | None = None
        self._closed: asyncio.Future | None = None
        # Shared with the loop's thread, under _wake's lock.
        self._wake = threading.Condition()
        self._batches: list[Sequence[Settlement]] = []
        self._waiting = 0              # settlements in _batches
        self._through_seq = record_sql.committed_seq(connection, instance)
        self._purges: list[asyncio.Future] = []
        self._closing = False
        # The writer thread's own (read under the lock by submit, which only
        # needs to know whether the thread may be asleep with nothing to do).
        self._committed_seq = self._through_seq
        self._unsynced_seq = 0         # committed, not yet made durable (with sync)
        self._last_sync = 0.0
        self._last_commit = 0.0
        self._retry_at = 0.0
        self._retry_s = RETRY_MIN_S
        self._retained_from = -record_sql.UNBOUNDED_MS
        self._trimming = False         # the last retention slice left rows behind
        self._trim_retry_at = 0.0

    def commit_now(self, settlements: Sequence[Settlement], through_seq: int) -> None:
        record_sql.commit_settlements(self._connection, self._instance, settlements, through_seq)
        self._committed_seq = self._through_seq = max(self._through_seq, through_seq)
        # Not counted here: the writer thread's first commit builds the recent
        # ledger again (a few tenths of a second), not the restart.
        self._recent.stale_unless(self._committed_seq)

    def start(self, loop: asyncio.AbstractEventLoop, on_committed: Callable[[int], None]) -> None:
        self._loop = loop
        self._on_committed = on_committed
        self._closed = loop.create_future()
        self._thread = start_named_thread(self._run, "record-writer")

    def submit(self, settlements: Sequence[Settlement], through_seq: int) -> None:
        with self._wake:
            idle = not self._waiting and self._through_seq <= self._committed_seq
            if settlements:
                self._batches.append(settlements)
                self._waiting += len(settlements)
            self._through_seq = max(self._through_seq, through_seq)
            if idle or self._waiting >= COMMIT_AT_ONCE:
                self._wake.notify()

    def purge(self) -> asyncio.Future[int]:
        assert self._loop is not None
        future = self._loop.create_future()
        with self._wake:
            self._purges.append(future)
            self._wake.notify()
        return future

    async def close(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._closing = True
                self._wake.notify()
            assert self._closed is not None
            await self._closed
            self._thread.join()
        self._connection.close()
        if self._wal is not None:
            self._wal.close()

    # On the writer thread.

    def _run(self) -> None:
        assert self._loop is not None and self._closed is not None
        try:
            while True:
                work = self._next_work()
                if work.batches or work.through_seq > self._committed_seq:
                    self._commit(work.batches, work.through_seq, work.closing)
                if self._unsynced_seq and (work.sync or work.closing):
                    self._make_durable()
                for future in work.purges:
                    self._purge(future)
                if work.closing:
                    return
                if work.trim:
                    self._trim()
        finally:
            self._loop.call_soon_threadsafe(_resolve, self._closed, None, None)

    def _next_work(self) -> _Work:
        """Wait until a commit is due (COMMIT_INTERVAL_S after the last one, at
        once when COMMIT_AT_ONCE settlements wait, or a purge or close is
        asked) or a retention slice is; take what is due."""
        with self._wake:
            while True:
                now = time.monotonic()
                commit_in, trim_in = self._commit_in(now), self._trim_in(now)
                sync_in = self._last_sync + SYNC_INTERVAL_S - now if self._unsynced_seq else None
                commit = self._closing or bool(self._purges) or (commit_in is not None and commit_in <= 0)
                trim = trim_in is not None and trim_in <= 0
                sync = sync_in is not None and sync_in <= 0
                if commit or trim or sync:
                    break
                waits = [wait for wait in (commit_in, trim_in, sync_in) if wait is not None]
                self._wake.wait(min(waits) if waits else None)
            if not commit:
                return _Work([], self._committed_seq, [], False, trim, sync)
            batches, self._batches = self._batches, []
            purges, self._purges = self._purges, []
            self._waiting = 0
            return _Work(batches, self._through_seq, purges, self._closing, trim, sync)

    def _commit_in(self, now: float) -> float | None:
        """Seconds until the next commit is due; None: nothing to commit."""
        if not self._waiting and self._through_seq <= self._committed_seq:
            return None
        if self._waiting >= COMMIT_AT_ONCE:
            return self._retry_at - now
        return max(self._last_commit + COMMIT_INTERVAL_S, self._retry_at) - now

    def _trim_in(self, now: float) -> float | None:
        """Seconds until the next retention slice is due, or until the writer
        looks at the day again; None: everything is kept."""
        if not self._retention_days:
            return None
        if self._trimming or self._cutoff_ms() > self._retained_from:
            return self._trim_retry_at - now
        return RETENTION_CHECK_S

    def _commit(self, batches: list[Sequence[Settlement]], through_seq: int, closing: bool) -> None:
        self._last_commit = time.monotonic()
        settlements = batches[0] if len(batches) == 1 else list(chain.from_iterable(batches))
        try:
            self._commit_and_count(settlements, through_seq)
        except sqlite3.Error as error:
            if closing:
                # Nothing is lost: the journal keeps what the record does not hold.
                log.error("payments record: commit failed at close, the journal keeps it: %s", error)
                return
            log.error("payments record: commit failed, retrying in %.2f s: %s", self._retry_s, error)
            with self._wake:
                self._batches[:0] = batches
                self._waiting += len(settlements)
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            return
        self._retry_s = RETRY_MIN_S
        if self._wal is not None:
            self._unsynced_seq = through_seq
            return
        self._report(through_seq)

    def _commit_and_count(self, settlements: Sequence[Settlement], through_seq: int) -> None:
        """Commit, then count what the commit inserted in the recent ledger
        before the ledger tail may drop it (on_committed)."""
        inserted = record_sql.commit_settlements(self._connection, self._instance, settlements, through_seq)
        committed, self._committed_seq = self._committed_seq, max(self._committed_seq, through_seq)
        code = self._recent.add(committed, self._committed_seq, inserted, self._clock_ms())
        if code:
            log.error("payments record: the recent ledger could not be built (SQLite error %d):"
                      " summaries read the record until a later commit builds it", code)

    def _make_durable(self) -> None:
        """One fdatasync of the WAL for every commit since the last: what the
        commits hold is in the WAL, or in the database file by a checkpoint
        that SQLite synced before it let the WAL start over."""
        assert self._wal is not None
        self._last_sync = time.monotonic()
        try:
            self._wal.sync()
        except OSError as error:
            log.error("payments record: syncing the WAL failed, retrying in %.1f s: %s", SYNC_INTERVAL_S, error)
            return
        seq, self._unsynced_seq = self._unsynced_seq, 0
        self._report(seq)

    def _report(self, through_seq: int) -> None:
        assert self._loop is not None and self._on_committed is not None
        self._loop.call_soon_threadsafe(self._on_committed, through_seq)

    def _purge(self, future: asyncio.Future) -> None:
        try:
            generation, error = record_sql.next_generation(self._connection), None
            self._recent.raise_generation(generation)
        except sqlite3.Error as failure:
            generation, error = None, failure
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, future, generation, error)

    def _trim(self) -> None:
        """One retention slice: rows and buckets from before the cutoff day."""
        cutoff = self._cutoff_ms()
        try:
            _, finished = record_sql.delete_before(self._connection, cutoff, RETENTION_SLICE_ROWS)
        except sqlite3.Error as error:
            log.error("payments record: retention slice failed, retrying in %.0f s: %s",
                      RETENTION_CHECK_S, error)
            self._trim_retry_at = time.monotonic() + RETENTION_CHECK_S
            return
        self._retained_from = cutoff
        self._trimming = not finished

    def _cutoff_ms(self) -> int:
        return (self._clock_ms() - self._retention_days * DAY_MS) // DAY_MS * DAY_MS


class _Work(NamedTuple):
    batches: list[Sequence[Settlement]]
    through_seq: int
    purges: list[asyncio.Future]
    closing: bool
    trim: bool
    sync: bool = False


class _DurableFile:
    """A file to fdatasync by path: opened at the first sync (SQLite makes
    the WAL at the first write) and again whenever the path names another
    file than the one held."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = -1

    def sync(self) -> None:
        if self._fd >= 0 and os.stat(self._path).st_ino != os.fstat(self._fd).st_ino:
            self.close()
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Reads:
    """Lookups and summaries: asked on the loop, answered in order by a
    thread of paycore.core.record_reader, read when its eventfd is readable;
    or, where no read waits for a device, answered at once on the loop.
    Summaries of the last hour are summed from the recent ledger first."""

    def __init__(self, path: str, recent: RecentLedger, clock_ms: Callable[[], int]) -> None:
        self._reader = RecordReader(path, record_sql.SUMMARY_STATEMENTS)
        self._inline = InlineReads(path, record_sql.SUMMARY_STATEMENTS)
        self._in_memory = InlineReads.in_memory(path)
        self._recent = recent
        self._clock_ms = clock_ms
        self._lookups: deque[tuple[list[bytes], asyncio.Future]] = deque()
        # Answers read, of a lookup not yet answered whole.
        self._lookup_answers: list[tuple[bytes, int, int, int, int, int]] = []
        self._summaries: deque[asyncio.Future] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._reader.event_fd, self._answered)
        self._thread = start_named_thread(self._reader.serve, "record-reader")

    def lookup(self, correlation_ids: list[bytes]) -> asyncio.Future:
        assert self._loop is not None
        future = self._loop.create_future()
        if not correlation_ids:
            future.set_result({})
            return future
        self._reader.ask(correlation_ids)
        self._lookups.append((correlation_ids, future))
        return future

    def holds_now(self, correlation_id: bytes) -> bool | None:
        if not self._in_memory:
            return None
        _, status, _, _, _, _ = self._inline.lookup([correlation_id])[0]
        if status == LookupStatus.FAILED:
            return None
        return status == LookupStatus.FOUND

    def summary(self, generation: int, from_ms: int | None, to_ms: int | None) -> Deferred[list[RangeRead]]:
        recent = self._recent.totals(generation, from_ms, to_ms)
        if recent is None:
            whole = ((from_ms, to_ms),)
            return then(self._read(record_sql.summary_query(generation, from_ms, to_ms), from_ms),
                        lambda read: [RangeRead(whole, *read)])
        totals, committed, covered_from, covered_to = recent
        held = RangeRead(((covered_from, covered_to),), totals, committed)
        # What lies before the recent ledger's 1 ms ring: a few milliseconds at each end.
        edges: list[tuple[int | None, int | None]] = []
        if from_ms is not None and covered_from > from_ms:
            edges.append((from_ms, covered_from - 1))
        if covered_to is not None and (to_ms is None or covered_to < to_ms):
            edges.append((covered_to + 1, to_ms))
        if not edges:
            return [held]
        return then(self._read(record_sql.edges_query(generation, edges), edges[0][0]),
                    lambda read: [held, RangeRead(tuple(edges), *read)])

    def _read(self, query: record_sql.SummaryQuery,
              from_ms: int | None) -> Deferred[tuple[Totals, dict[str, int]]]:
        """Run a summary statement: on the loop where it waits for no device
        (a record in memory, or a range that starts within RECENT_SUMMARY_MS),
        else on the reader thread."""
        assert self._loop is not None
        if self._in_memory or (from_ms is not None and from_ms >= self._clock_ms() - RECENT_SUMMARY_MS):
            error, totals, committed = self._inline.summary(*query)
            if not error:
                return totals, committed
        future = self._loop.create_future()
        self._reader.ask_summary(*query)
        self._summaries.append(future)
        return future

    async def close(self) -> None:
        if self._thread is not None:
            assert self._loop is not None
            self._reader.stop()
            await asyncio.to_thread(self._thread.join)
            self._loop.remove_reader(self._reader.event_fd)
            self._answered()
        self._reader.close()
        self._inline.close()

    def _answered(self) -> None:
        lookup_answers, summary_answers = self._reader.answers()
        for error, totals, committed in summary_answers:
            _resolve(self._summaries.popleft(), (totals, committed),
                     _read_failed("summary", error) if error else None)
        answers = self._lookup_answers
        answers.extend(lookup_answers)
        taken = 0
        while self._lookups and len(answers) - taken >= len(self._lookups[0][0]):
            ids, future = self._lookups.popleft()
            mine = answers[taken:taken + len(ids)]
            taken += len(ids)
            failed = next((error for _, status, _, _, _, error in mine if status == LookupStatus.FAILED), None)
            if failed is not None:
                _resolve(future, None, _read_failed("lookup", failed))
            else:
                _resolve(future, {correlation_id: Attempt(Payment(correlation_id, cents), processor, requested_at_ms)
                                  for correlation_id, status, cents, processor, requested_at_ms, _ in mine
                                  if status == LookupStatus.FOUND}, None)
        del answers[:taken]


def _read_failed(what: str, code: int) -> sqlite3.OperationalError:
    return sqlite3.OperationalError(f"payments record {what} failed: SQLite error {code}")


def _resolve(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
