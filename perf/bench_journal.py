"""What journaling a payment costs the instance, per payment, by batch size.

A batch is what one pass of the event loop appends: 1 payment when requests
arrive one at a time (the benchmark's usual case at ~300 req/s per instance),
more when they bunch up. Each payment is two records (ACCEPTED, SENDING); a
batch costs one write, plus one fdatasync with PAYCORE_JOURNAL_SYNC=1.
Medians of 7 repeats, side by side in one run, on tmpfs (/dev/shm, the
default) and on the disk holding the repository.
Run: .venv/bin/python perf/bench_journal.py
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from paycore.core.journal import Journal

PAYMENTS = 20_000
SYNCED_PAYMENTS = 500  # fdatasync is slow enough that fewer tell the story
REPEATS = 7
BATCH_SIZES = (1, 16)


def per_payment_us(directory: str, batch: int, sync: bool) -> float:
    payments = SYNCED_PAYMENTS if sync else PAYMENTS
    ids = [uuid.uuid4().bytes for _ in range(payments)]
    samples = []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            journal = Journal(os.path.join(scratch, "journal.log"), sync)
            started = time.perf_counter_ns()
            for index, uuid16 in enumerate(ids, 1):
                journal.accepted(uuid16, 2005, 0)
                journal.sending(uuid16, 0, 1_700_000_000_000, 0)
                if index % batch == 0:
                    journal.flush()
            journal.flush()
            samples.append((time.perf_counter_ns() - started) / payments / 1000)
            journal.close()
    return statistics.median(samples)


def main() -> None:
    places = {"tmpfs": "/dev/shm", "disk": str(Path(__file__).resolve().parents[1] / "build")}
    Path(places["disk"]).mkdir(exist_ok=True)
    print(f"{'where':<6} {'sync':<5} " + " ".join(f"{f'batch {size}':>12}" for size in BATCH_SIZES)
          + "   (µs per payment, median)")
    for name, directory in places.items():
        for sync in (False, True):
            costs = [per_payment_us(directory, size, sync) for size in BATCH_SIZES]
            print(f"{name:<6} {str(sync):<5} " + " ".join(f"{cost:>12.2f}" for cost in costs))


if __name__ == "__main__":
    main()
