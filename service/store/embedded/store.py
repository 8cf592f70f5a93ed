"""The default store: every instance on one host shares memory-mapped files on
tmpfs (the ledger's regions, the accepted ids, the health board), and each
instance keeps its own journal of what it promised and sent (journal.py),
replayed at its next start (recovery.py). No server to run."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from paycore.core.accepted_ids import CLAIMED, CONFLICT, DUPLICATE, FULL, AcceptedIds
from paycore.core.journal import Journal
from paycore.core.ledger import Ledger
from paycore.core.ring_queue import RingQueue

from ...config import Settings
from ..base import Acceptance, PendingWork, Totals
from .health_board import FileHealthBoard
from .journal import JournalWriter
from .recovery import Replay, recover

log = logging.getLogger("paycore.store")

_ACCEPTANCE = {CLAIMED: Acceptance.ACCEPTED, DUPLICATE: Acceptance.DUPLICATE,
               CONFLICT: Acceptance.CONFLICT, FULL: Acceptance.IDS_FULL}


class EmbeddedStore:
    def __init__(self, settings: Settings,
                 open_journal: Callable[[str, bool], Journal] = Journal) -> None:
        os.makedirs(settings.shared_dir, exist_ok=True)
        os.makedirs(settings.journal_dir, exist_ok=True)
        self._journal_path = os.path.join(settings.journal_dir, f"journal-{settings.instance}.log")
        self._journal_sync = settings.journal_sync
        self._open_journal = open_journal
        self.ledger = Ledger(settings.shared_dir, settings.instance, settings.ledger_capacity)
        self.accepted_ids = AcceptedIds(os.path.join(settings.shared_dir, "accepted-ids.shm"),
                                        settings.accepted_id_slots)
        self.health = FileHealthBoard(settings.shared_dir)
        self.journal: JournalWriter | None = None
        self._queue: RingQueue | None = None
        self._work: PendingWork | None = None

    async def start(self, queue: RingQueue, work: PendingWork) -> None:
        # The ledger region is this instance's alone, so nobody writes its journal meanwhile.
        replay = recover(self._journal_path, self.ledger.generation, self._journal_sync)
        self._restore(replay)
        self.journal = JournalWriter(self._open_journal(self._journal_path, self._journal_sync), self.ledger)
        self._queue = queue
        self._work = work
        work.resume(replay.unsent, replay.unresolved)

    def _restore(self, replay: Replay) -> None:
        """This instance's ledger share and accepted ids, as its journal has them
        (the shared directory may have been lost)."""
        self.ledger.restore(replay.generation, replay.settled)
        refused = sum(self.accepted_ids.claim(uuid16, cents) == FULL for uuid16, cents in replay.accepted)
        if refused:
            log.error("%d journaled payment ids did not fit the accepted-id table", refused)
        if replay.unsent or replay.unresolved:
            log.warning("resuming %d unsent payments and %d with an unknown outcome from the journal",
                        len(replay.unsent), len(replay.unresolved))

    def accept(self, uuid16: bytes, cents: int) -> Acceptance:
        queue = self._queue
        # Checked before the claim, so a claimed payment always fits the queue.
        if queue.is_full:
            return Acceptance.QUEUE_FULL
        claim = self.accepted_ids.claim(uuid16, cents)
        if claim == CLAIMED:
            queue.push(uuid16, cents)
            self.journal.accepted(uuid16, cents)
            self._work.notify()
            return Acceptance.ACCEPTED
        return _ACCEPTANCE[claim]

    def after_durable(self, callback: Callable[..., Any], *args: Any) -> None:
        self.journal.after_durable(callback, *args)

    def flush_waiting(self) -> None:
        self.journal.flush_waiting()

    def sending(self, uuid16: bytes, processor: int, requested_at_ms: int) -> asyncio.Future:
        self.journal.sending(uuid16, processor, requested_at_ms)
        return self.journal.durable()

    def settle(self, uuid16: bytes, processor: int, requested_at_ms: int, cents: int) -> None:
        self.journal.settled(uuid16, processor, requested_at_ms, cents)
        self.ledger.record(processor, requested_at_ms, cents)

    def summary(self, from_ms: int | None, to_ms: int | None) -> Totals:
        return self.ledger.summary(from_ms, to_ms)

    def purge(self) -> None:
        """Every instance's ledger region and the accepted ids start over."""
        self.ledger.purge()
        self.accepted_ids.purge()

    async def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.health.close()
        self.ledger.close()
        self.accepted_ids.close()
