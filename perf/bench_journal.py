"""How long an answer waits for the journal, where the journal lives, and
the device's own floor under a synced batch.

Each payment appends what the request path appends (ACCEPTED, then SENDING)
and ends its batch as the event loop does at the end of a read: written on
the caller's thread for tmpfs (`write_here`, LoopJournalWriter), handed to
the writer thread for a disk (`submit`, then the eventfd that wakes the loop:
ThreadedJournalWriter), with and without a sync per batch. Batches of one
payment arrive BATCH_INTERVAL_MS apart (about the final round's peak rate
per instance); each is timed from the end of its batch to the moment it is
durable: what an answer waits, beside what the device itself takes to make
one record durable (pwrite of a record into a preallocated file, then
fdatasync), the floor under any answer that waits for a sync. Then the cost
per payment of back-to-back batches of 1 and 16 payments. Side by side in
one run: the same device, the same minute.

Run: .venv/bin/python perf/bench_journal.py  (JOURNAL_BATCHES, default 1500;
JOURNAL_DISK_DIR, default build/ in the checkout)
"""
from __future__ import annotations

import os
import select
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from report import percentile

from paycore.core.journal import Journal

BATCHES = int(os.environ.get("JOURNAL_BATCHES", "1500"))
BATCH_INTERVAL_MS = 3.0
RECORD_BYTES = 56  # sizeof(JournalRecord)
THROUGHPUT_PAYMENTS = 2000
THROUGHPUT_BATCHES = (1, 16)
TMPFS = "/dev/shm"


class OpenJournal:
    """A recovered, empty journal in its own directory, ended batch by batch
    as the service's writer for that place would end it."""

    def __init__(self, directory: str, sync: bool) -> None:
        self.journal = Journal(directory, sync)
        self.journal.recover(0, lambda settlements: None)
        self._thread: threading.Thread | None = None
        if self.journal.in_memory:
            self.journal.open_here()
            self.end_batch: Callable[[], None] = self._write_here
        else:
            self._thread = threading.Thread(target=self.journal.serve, name="journal-writer")
            self._thread.start()
            self._poller = select.poll()
            self._poller.register(self.journal.event_fd, select.POLLIN)
            self.end_batch = self._submit_and_wait

    def append_payment(self) -> None:
        correlation_id = uuid.uuid4().bytes
        self.journal.accepted(correlation_id, 1990)
        self.journal.sending(correlation_id, 0, time.time_ns() // 1_000_000)

    def _write_here(self) -> None:
        if not self.journal.write_here():
            raise OSError(self.journal.error, os.strerror(self.journal.error))

    def _submit_and_wait(self) -> None:
        target = self.journal.appended_seq
        self.journal.submit()
        while self.journal.durable_seq < target:
            self._poller.poll(1000)
            self.journal.drain_event()
            if self.journal.error:
                raise OSError(self.journal.error, os.strerror(self.journal.error))

    def close(self) -> None:
        if self._thread is not None:
            self.journal.stop()
            self._thread.join()
        self.journal.close()


def paced(step: Callable[[], float]) -> list[float]:
    """step() BATCHES times, BATCH_INTERVAL_MS apart; its results in µs."""
    waits = []
    next_at = time.perf_counter()
    for _ in range(BATCHES):
        next_at += BATCH_INTERVAL_MS / 1000
        waits.append(step())
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return waits


def journal_waits(directory: str, sync: bool) -> list[float]:
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        journal = OpenJournal(os.path.join(scratch, "journal"), sync)
        try:
            def one_batch() -> float:
                journal.append_payment()
                started = time.perf_counter_ns()
                journal.end_batch()
                return (time.perf_counter_ns() - started) / 1000
            return paced(one_batch)
        finally:
            journal.close()


def device_flushes(directory: str) -> list[float]:
    """One record written into a preallocated file and made durable, alone."""
    record = b"\0" * RECORD_BYTES
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        fd = os.open(os.path.join(scratch, "flush"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, BATCHES * RECORD_BYTES)
            os.fsync(fd)
            offset = 0

            def one_flush() -> float:
                nonlocal offset
                started = time.perf_counter_ns()
                os.pwrite(fd, record, offset)
                os.fdatasync(fd)
                offset += RECORD_BYTES
                return (time.perf_counter_ns() - started) / 1000
            return paced(one_flush)
        finally:
            os.close(fd)


def per_payment_us(directory: str, sync: bool, batch: int) -> float:
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        journal = OpenJournal(os.path.join(scratch, "journal"), sync)
        try:
            payments = THROUGHPUT_PAYMENTS // (8 if sync and not journal.journal.in_memory else 1)
            started = time.perf_counter_ns()
            for index in range(1, payments + 1):
                journal.append_payment()
                if index % batch == 0:
                    journal.end_batch()
            journal.end_batch()
            return (time.perf_counter_ns() - started) / payments / 1000
        finally:
            journal.close()


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    return " ".join(f"{percentile(ordered, fraction):>8.0f}" for fraction in (0.5, 0.99, 0.999))


def main() -> None:
    disk = os.environ.get("JOURNAL_DISK_DIR", str(Path(__file__).resolve().parents[1] / "build"))
    Path(disk).mkdir(exist_ok=True)
    rows = [("tmpfs, written on the loop", lambda: journal_waits(TMPFS, False)),
            ("disk, writer thread", lambda: journal_waits(disk, False)),
            ("disk, writer thread, sync", lambda: journal_waits(disk, True)),
            ("disk, the device alone: pwrite + fdatasync", lambda: device_flushes(disk))]
    print(f"{BATCHES} batches of one payment, {BATCH_INTERVAL_MS:g} ms apart; "
          f"µs from the end of a batch to durable ({disk} for the disk)")
    print(f"{'':<44} {'p50':>8} {'p99':>8} {'p99.9':>8}")
    for name, measure in rows:
        print(f"{name:<44} {quantiles(measure())}")
    print("\nback to back, µs per payment: " + ", ".join(f"batches of {size}" for size in THROUGHPUT_BATCHES))
    for name, directory, sync in (("tmpfs", TMPFS, False), ("disk", disk, False), ("disk, sync", disk, True)):
        costs = [per_payment_us(directory, sync, size) for size in THROUGHPUT_BATCHES]
        print(f"{name:<12} " + " ".join(f"{cost:>10.2f}" for cost in costs))


if __name__ == "__main__":
    main()
