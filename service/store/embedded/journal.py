"""Group commit: what the service promises or attempts is journaled before it
leaves the process.

Records appended while handling one read (a connection's requests) or one
pass of the dispatcher are written together with one write (and one fdatasync
when PAYCORE_JOURNAL_SYNC=1) at its end, by whoever appended them (`flush`); a
callback scheduled at the first append is the safety net. Only then do the
answers that promised those payments go out (`after_durable`) and the sends
that were recorded start (`durable`). If the write fails, the batch is kept
and retried: nothing is promised or sent that the journal does not hold.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from paycore.core.journal import Journal
from paycore.core.ledger import Ledger

log = logging.getLogger("paycore.journal")

RETRY_AFTER_ERROR_S = 0.05


class JournalWriter:
    def __init__(self, journal: Journal, ledger: Ledger) -> None:
        self._journal = journal
        self._ledger = ledger  # its purge generation stamps every record
        self._loop = asyncio.get_running_loop()
        self._waiting: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._batch_written: asyncio.Future | None = None
        self._nothing_to_wait_for = self._loop.create_future()
        self._nothing_to_wait_for.set_result(True)
        # The pending write: scheduled at the first promise or send of a batch,
        # or the retry after a failed write. None: nobody waits.
        self._scheduled_flush: asyncio.Handle | None = None
        self.batches = 0
        self.records = 0

    @property
    def waiting(self) -> bool:
        """A promise or a send is appended and not yet written."""
        return self._scheduled_flush is not None

    @property
    def backlog(self) -> int:
        """Records appended and not yet written."""
        return self._journal.pending

    def accepted(self, uuid16: bytes, cents: int) -> None:
        self._journal.accepted(uuid16, cents, self._ledger.generation)
        self._schedule_flush()

    def sending(self, uuid16: bytes, processor: int, requested_at_ms: int) -> None:
        self._journal.sending(uuid16, processor, requested_at_ms, self._ledger.generation)
        self._schedule_flush()

    def settled(self, uuid16: bytes, processor: int, requested_at_ms: int, cents: int) -> None:
        """Rides along with the next batch: nothing waits on it, and if a crash
        loses it the restart asks the processor instead (recovery.py)."""
        self._journal.settled(uuid16, processor, requested_at_ms, cents, self._ledger.generation)

    def after_durable(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run callback(*args) once every promise or send appended so far is
        written: at once when none is waiting. Callbacks run in the order given."""
        if self.waiting:
            self._waiting.append((callback, args))
        else:
            callback(*args)

    def durable(self) -> asyncio.Future:
        """A future of True once every promise or send appended so far is written."""
        if not self.waiting:
            return self._nothing_to_wait_for
        if self._batch_written is None:
            self._batch_written = self._loop.create_future()
        return self._batch_written

    def flush(self) -> None:
        """Write the batch now and release what waited on it: at the end of a
        read that appended promises, so answers leave in the same callback,
        and at shutdown. The flush that was scheduled is then called off."""
        if self._scheduled_flush is not None:
            self._scheduled_flush.cancel()
            self._scheduled_flush = None
        try:
            written = self._journal.flush()
        except OSError as error:
            log.error("journal write failed, retrying: %s", error)
            self._scheduled_flush = self._loop.call_later(RETRY_AFTER_ERROR_S, self.flush)
            return
        if written:
            self.batches += 1
            self.records += written
        batch_written, self._batch_written = self._batch_written, None
        if batch_written is not None and not batch_written.done():
            batch_written.set_result(True)
        waiting, self._waiting = self._waiting, []
        for callback, args in waiting:
            callback(*args)

    def close(self) -> None:
        self.flush()
        self._journal.close()

    def flush_waiting(self) -> None:
        """Write the batch if a promise or a send waits in it."""
        if self.waiting:
            self.flush()

    def _schedule_flush(self) -> None:
        if self._scheduled_flush is None:
            self._scheduled_flush = self._loop.call_soon(self.flush)
