"""The payments record (service/store/embedded/record.py): what summaries,
lookups and commits cost, what the event loop feels of the writer thread, and
the disk a payment takes. Medians of REPEATS runs where a figure is a rate.

1. A record of one day at ~580 payments/s (50 M payments by default, built
   once through the record's own commit path, in a temporary directory on
   the disk holding the repository; minutes): bytes per payment, summaries of
   the checker's window [t-15 s, t-2 s] within the last hour (the statement
   alone, and through the record's reader thread, C without the GIL, on the
   plain host and with idle CPUs polling as `BENCH_LOW_LATENCY_HOST=1 make
   bench` has them; root), checked against a plain sum over the rows,
   one-day ranges, lookups.
2. The writer: settlements/s it commits with the loop idle, process CPU and
   bytes written per settlement, into a new record and into the big one; and a busy uvloop loop running small work items back to back,
   their p99 without the writer, and while the writer commits 5,000
   settlements/s handed from that loop.
3. Retention: deleting a day of a two-day record, slice by slice.
4. Why WAL: a group commit's cost in WAL and rollback-journal modes.

Run: .venv/bin/python perf/bench_record.py [--rows N] [--keep PATH]
(--keep: build the big record at PATH once and reuse it on later runs).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import resource
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import uvloop
from host import LowLatencyHost
from report import percentile

from paycore.service.store.base import resolve
from paycore.service.store.embedded import record_sql
from paycore.service.store.embedded.record import RETENTION_SLICE_ROWS, PaymentsRecord, Settlement

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
START_MS = 1_752_537_600_000  # 2025-07-15T00:00:00Z
BUILD_BATCH = 50_000
REPEATS = 5
QUERIES = 2000
WRITER_SETTLEMENTS = 100_000
TARGET_RATE = 5_000          # settlements/s handed to the writer under the busy loop
BUSY_SECONDS = 4.0
WORK_ITEM_LOOPS = 150        # one work item: ~5 µs of Python
RETENTION_ROWS = 2_000_000
REPO = Path(__file__).resolve().parents[1]


def synthetic(rng: random.Random, count: int, first_ms: int, span_ms: int, seq: int) -> list[Settlement]:
    """Payments spread evenly over the span, a little out of order, 95 % to the default."""
    ids = rng.randbytes(16 * count)
    step = span_ms / count
    return [Settlement(ids[16 * i:16 * i + 16], rng.randint(100, 500_000), int(rng.random() < 0.05),
                       first_ms + int(i * step) + rng.randint(-500, 0), 0, seq)
            for i in range(count)]


def build(path: str, rows: int) -> float:
    """The big record, one day of payments; seconds it took."""
    started = time.perf_counter()
    connection = record_sql.connect_writer(path)
    rng = random.Random(1)
    span_per_row = DAY_MS / rows
    for batch, first in enumerate(range(0, rows, BUILD_BATCH)):
        count = min(BUILD_BATCH, rows - first)
        settlements = synthetic(rng, count, START_MS + int(first * span_per_row), int(count * span_per_row), batch)
        record_sql.commit_settlements(connection, "bench", settlements, batch + 1)
        if batch % 100 == 99:
            print(f"  built {first + count:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    return time.perf_counter() - started


def disk_report(path: str) -> None:
    connection = sqlite3.connect(path)
    rows = connection.execute("SELECT count(*) FROM payments").fetchone()[0]
    size = os.path.getsize(path)
    print(f"disk: {rows:,} payments, {size / 2**30:.2f} GiB, {size / rows:.1f} bytes per payment")
    for name, used in connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"):
        print(f"  {name:<28} {used / rows:6.1f} bytes per payment")
    buckets = connection.execute("SELECT level, count(*) FROM buckets GROUP BY level").fetchall()
    print("  bucket rows per level: " + ", ".join(f"{level}: {count:,}" for level, count in buckets))
    connection.close()


def summaries(path: str) -> None:
    """Direct and threaded summary costs."""
    rng = random.Random(2)
    end_ms = START_MS + DAY_MS
    windows = []
    for _ in range(QUERIES):
        now = end_ms - rng.randrange(HOUR_MS - 15_000)
        windows.append((now - 15_000, now - 2_000))
    connection = record_sql.connect_reader(path)

    def read_directly(from_ms: int | None, to_ms: int | None) -> float:
        """µs to run the summary's statement on this thread (Python's sqlite3)."""
        started = time.perf_counter_ns()
        statement, parameters = record_sql.summary_query(0, from_ms, to_ms)
        connection.execute(record_sql.SUMMARY_STATEMENTS[statement], parameters).fetchall()
        return (time.perf_counter_ns() - started) / 1000

    direct = [read_directly(from_ms, to_ms) for from_ms, to_ms in windows]
    day = []
    for _ in range(200):
        from_ms = START_MS + rng.randrange(HOUR_MS)
        day.append(read_directly(from_ms, from_ms + DAY_MS - HOUR_MS - rng.randrange(HOUR_MS)))
    everything_us = read_directly(None, None)

    ids = [row[0] for row in connection.execute("SELECT correlation_id FROM payments LIMIT 200000")]
    lookups = {}
    for size in (1, 64):
        samples = []
        for _ in range(300):
            wanted = rng.sample(ids, size // 2 or 1) + [rng.randbytes(16) for _ in range(size - (size // 2 or 1))]
            started = time.perf_counter_ns()
            record_sql.settled_among(connection, wanted)
            samples.append((time.perf_counter_ns() - started) / 1000)
        lookups[size] = statistics.median(samples)

    async def threaded() -> list[float]:
        record = PaymentsRecord(path, "reader", os.path.dirname(path), sync=False)
        record.open()
        record.start(asyncio.get_running_loop(), lambda seq: None)
        # The same answer as a plain sum over the rows.
        for from_ms, to_ms in windows[:50]:
            plain = [0, 0, 0, 0]
            for processor, count, cents in connection.execute(
                    "SELECT processor, count(*), sum(cents) FROM payments WHERE requested_at_ms BETWEEN ? AND ? "
                    "GROUP BY processor", (from_ms, to_ms)):
                plain[2 * processor:2 * processor + 2] = count, cents
            reads = await resolve(record.summary(0, from_ms, to_ms))
            assert tuple(map(sum, zip(*(read.totals for read in reads)))) == tuple(plain)
        samples = []
        for from_ms, to_ms in windows:
            started = time.perf_counter_ns()
            await resolve(record.summary(0, from_ms, to_ms))
            samples.append((time.perf_counter_ns() - started) / 1000)
        await record.close()
        return samples

    async def bare_hop() -> list[float]:
        """For comparison: a future resolved by a Python thread, as summaries were."""
        loop = asyncio.get_running_loop()
        jobs: queue.SimpleQueue = queue.SimpleQueue()

        def answer() -> None:
            while (future := jobs.get()) is not None:
                loop.call_soon_threadsafe(future.set_result, None)

        thread = threading.Thread(target=answer)
        thread.start()
        samples = []
        for _ in windows:
            started = time.perf_counter_ns()
            future = loop.create_future()
            jobs.put(future)
            await future
            samples.append((time.perf_counter_ns() - started) / 1000)
        jobs.put(None)
        thread.join()
        return samples

    hop = uvloop.run(threaded())
    floor = uvloop.run(bare_hop())
    with LowLatencyHost():
        polling_hop = uvloop.run(threaded())
        polling_floor = uvloop.run(bare_hop())
    connection.close()
    print(f"summary [t-15 s, t-2 s] in the last hour, {QUERIES} windows (µs): "
          f"direct median {statistics.median(direct):.0f} p99 {percentile(sorted(direct), 0.99):.0f}; "
          f"through the reader thread median {statistics.median(hop):.0f} p99 {percentile(sorted(hop), 0.99):.0f} "
          f"(a bare hop through a Python thread: median {statistics.median(floor):.0f} p99 {percentile(sorted(floor), 0.99):.0f}); "
          f"the same with idle CPUs polling (perf/host.py) median {statistics.median(polling_hop):.0f} "
          f"p99 {percentile(sorted(polling_hop), 0.99):.0f} (bare hop median {statistics.median(polling_floor):.0f} "
          f"p99 {percentile(sorted(polling_floor), 0.99):.0f})")
    print(f"summary of a ~one-day range (200 ranges): median {statistics.median(day) / 1000:.2f} ms, "
          f"max {max(day) / 1000:.2f} ms; all of history {everything_us / 1000:.2f} ms")
    print(f"lookup, direct: 1 id {lookups[1]:.0f} µs, 64 ids (half held) {lookups[64]:.0f} µs")


class Throughput(NamedTuple):
    per_s: float
    cpu_us: float         # process CPU per settlement
    written_bytes: float  # per settlement: WAL frames, then checkpoints into the file


async def writer_throughput(path: str) -> Throughput:
    """The writer's throughput with the loop idle. New payments each time,
    after what earlier runs left."""
    batches = WRITER_SETTLEMENTS // 100
    record = PaymentsRecord(path, "writer", os.path.dirname(path), sync=False)
    record.open()
    first = record.committed_seq()
    rng = random.Random(first)
    prepared = [synthetic(rng, 100, START_MS + DAY_MS + i * 20, 20, 0) for i in range(batches)]
    done = asyncio.Event()
    record.start(asyncio.get_running_loop(), lambda seq: done.set() if seq == first + batches else None)
    cpu, wall = time.process_time(), time.perf_counter()
    written = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    for seq, settlements in enumerate(prepared, first + 1):
        record.submit(settlements, seq)
    await done.wait()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    written = (resource.getrusage(resource.RUSAGE_SELF).ru_oublock - written) * 512
    await record.close()
    return Throughput(WRITER_SETTLEMENTS / wall, cpu / WRITER_SETTLEMENTS * 1e6, written / WRITER_SETTLEMENTS)


class BusyLoop(NamedTuple):
    item_p50_us: float
    item_p99_us: float
    item_p999_us: float
    item_max_us: float
    committed_per_s: float = 0.0
    commit_p50_ms: float = 0.0   # from submit to on_committed
    commit_p99_ms: float = 0.0


async def busy_loop(path: str | None) -> BusyLoop:
    """Work items back to back for BUSY_SECONDS (each item's time is from its
    start to the next one's); with a path, TARGET_RATE settlements/s handed
    to the writer every 20 ms from the same loop."""
    loop = asyncio.get_running_loop()
    per_batch = TARGET_RATE // 50
    rng = random.Random(4)
    batches = [synthetic(rng, per_batch, START_MS + 2 * DAY_MS + seq * 20, 20, seq)
               for seq in range(1, int(BUSY_SECONDS * 50) + 2)]
    submitted: list[int] = []
    commit_latencies: list[float] = []

    def on_committed(seq: int) -> None:
        now = time.perf_counter_ns()
        while len(commit_latencies) < seq:
            commit_latencies.append((now - submitted[len(commit_latencies)]) / 1e6)

    record = None
    if path is not None:
        record = PaymentsRecord(path, "busy", os.path.dirname(path), sync=False)
        record.open()
        record.start(loop, on_committed)
    starts: list[int] = []
    finished = loop.create_future()
    deadline = time.perf_counter() + BUSY_SECONDS

    def item() -> None:
        starts.append(time.perf_counter_ns())
        total = 0
        for value in range(WORK_ITEM_LOOPS):
            total += value * value
        if time.perf_counter() < deadline:
            loop.call_soon(item)
        else:
            finished.set_result(None)

    def hand() -> None:
        if finished.done():
            return
        assert record is not None
        submitted.append(time.perf_counter_ns())
        record.submit(batches[len(submitted) - 1], len(submitted))
        loop.call_later(0.02, hand)

    loop.call_soon(item)
    if record is not None:
        loop.call_soon(hand)
    await finished
    gaps = sorted((b - a) / 1000 for a, b in zip(starts, starts[1:]))
    result = BusyLoop(statistics.median(gaps), percentile(gaps, 0.99), percentile(gaps, 0.999), gaps[-1])
    if record is not None:
        committed = len(commit_latencies)
        await record.close()
        result = result._replace(committed_per_s=committed * per_batch / BUSY_SECONDS,
                                 commit_p50_ms=statistics.median(commit_latencies),
                                 commit_p99_ms=percentile(sorted(commit_latencies), 0.99))
    return result


def busy_beside_writer(scratch: str) -> BusyLoop:
    """busy_loop with the writer committing into a new record."""
    path = os.path.join(scratch, "busy.db")
    try:
        return uvloop.run(busy_loop(path))
    finally:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


def commit_row_by_row(connection: sqlite3.Connection, instance: str, settlements, through_seq: int) -> None:
    """The commit as executemany would do it, for comparison: the same
    transaction, but the writer takes the GIL back for every row."""
    connection.execute("BEGIN IMMEDIATE")
    connection.executemany(record_sql.INSERT_PAYMENTS[1], (settlement[:5] for settlement in settlements))
    connection.execute(record_sql.ADD_FRESH_TO_BUCKETS)
    connection.execute("DELETE FROM fresh")
    connection.execute(record_sql.ADVANCE_COMMITTED, (instance, through_seq))
    connection.execute("COMMIT")


def retention_cost(directory: str) -> tuple[float, float]:
    """A record of two days (RETENTION_ROWS payments), its first day deleted
    as the writer does, a slice at a time: median ms per slice, payments
    deleted per second."""
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        connection = record_sql.connect_writer(os.path.join(scratch, "payments.db"))
        rng = random.Random(6)
        per_batch = RETENTION_ROWS // 40
        for batch in range(40):
            settlements = synthetic(rng, per_batch, START_MS + batch * DAY_MS // 20, DAY_MS // 20, batch)
            record_sql.commit_settlements(connection, "1", settlements, batch + 1)
        slices = []
        started = time.perf_counter()
        finished = False
        while not finished:
            slice_started = time.perf_counter_ns()
            _, finished = record_sql.delete_before(connection, START_MS + DAY_MS, RETENTION_SLICE_ROWS)
            slices.append((time.perf_counter_ns() - slice_started) / 1e6)
        elapsed = time.perf_counter() - started
        connection.close()
    return statistics.median(slices), RETENTION_ROWS / 2 / elapsed


def commit_cost(directory: str, journal_mode: str, synchronous: str) -> float:
    """Median µs of a group commit of 100 settlements into a record of 100,000."""
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        path = os.path.join(scratch, "payments.db")
        connection = record_sql.connect_writer(path)
        connection.execute(f"PRAGMA journal_mode = {journal_mode}")
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        rng = random.Random(5)
        record_sql.commit_settlements(connection, "1", synthetic(rng, 100_000, START_MS, HOUR_MS, 1), 1)
        samples = []
        for seq in range(2, 202):
            settlements = synthetic(rng, 100, START_MS + HOUR_MS + seq * 20, 20, seq)
            started = time.perf_counter_ns()
            record_sql.commit_settlements(connection, "1", settlements, seq)
            samples.append((time.perf_counter_ns() - started) / 1000)
        connection.close()
        return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--keep", help="build the big record here once, and reuse it")
    args = parser.parse_args()
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "build") as scratch:
        path = args.keep or os.path.join(scratch, "payments.db")
        if not os.path.exists(path):
            print(f"building a record of {args.rows:,} payments over one day at {path}", flush=True)
            print(f"built in {build(path, args.rows):.0f} s")
        disk_report(path)
        summaries(path)

        into_new = [uvloop.run(writer_throughput(os.path.join(scratch, f"writer-{run}.db")))
                    for run in range(REPEATS)]
        into_big = [uvloop.run(writer_throughput(path)) for _ in range(REPEATS)]
        for name, runs in (("a new record", into_new), ("the big record", into_big)):
            print(f"writer, loop idle, into {name}: {statistics.median(run.per_s for run in runs):,.0f} "
                  f"settlements/s, {statistics.median(run.cpu_us for run in runs):.1f} µs process CPU and "
                  f"{statistics.median(run.written_bytes for run in runs) / 1024:.1f} KiB written per settlement")

        alone = [uvloop.run(busy_loop(None)) for _ in range(REPEATS)]
        beside = [busy_beside_writer(scratch) for _ in range(REPEATS)]
        multi_row = record_sql.commit_settlements
        record_sql.commit_settlements = commit_row_by_row
        try:
            row_by_row = [busy_beside_writer(scratch) for _ in range(REPEATS)]
        finally:
            record_sql.commit_settlements = multi_row

        def field(runs: list[BusyLoop], name: str) -> float:
            return statistics.median(getattr(run, name) for run in runs)

        for name, runs in (("alone", alone), (f"writer committing {TARGET_RATE:,}/s", beside),
                           ("the same, inserting with executemany", row_by_row)):
            print(f"busy loop, work items (µs), {name}: p50 {field(runs, 'item_p50_us'):.1f} "
                  f"p99 {field(runs, 'item_p99_us'):.1f} p99.9 {field(runs, 'item_p999_us'):.1f} "
                  f"max {field(runs, 'item_max_us'):.0f}")
        for name, runs in (("the writer beside it", beside), ("the same, inserting with executemany", row_by_row)):
            print(f"  {name}: committed {field(runs, 'committed_per_s'):,.0f} settlements/s, "
                  f"submit to on_committed p50 {field(runs, 'commit_p50_ms'):.1f} ms "
                  f"p99 {field(runs, 'commit_p99_ms'):.1f} ms")

    disk = str(REPO / "build")
    slice_ms, deleted_per_s = retention_cost(disk)
    print(f"retention: a slice ({RETENTION_SLICE_ROWS:,} rows per table and level) {slice_ms:.1f} ms median, "
          f"{deleted_per_s:,.0f} payments deleted per second")
    for journal_mode, synchronous in (("WAL", "NORMAL"), ("WAL", "FULL"), ("DELETE", "FULL")):
        costs = [commit_cost(disk, journal_mode, synchronous) for _ in range(3)]
        print(f"group commit of 100 settlements, {journal_mode:<6} synchronous={synchronous:<6}: "
              f"{statistics.median(costs):,.0f} µs")


if __name__ == "__main__":
    main()
