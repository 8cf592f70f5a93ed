"""The recent ledger (pyx/recent_ledger.pyx) against the payments record's
statement, in one process: what a summary of the last hour costs each way,
and what building the recent ledger again from the record takes.

A record in a temporary directory on the disk holding the repository, filled
through the record's own commit path with RECENT_RATE (600) payments/s over
the last hour; the recent ledger in /dev/shm, built from it. Per range (the
checker's window [now - 15 s, now - 2 s]; the last hour from a millisecond
off a 10 ms boundary, whose first milliseconds are a statement over payments
rows): the median and p99 of RECENT_QUERIES (3,000) reads, back to back
(caches warm), through the recent ledger (its edges, if any, through the
record) and through the record's statement alone, the answers checked equal;
then the last hour through the recent ledger again, a third as many reads,
one every 5 ms, while a writer commits RECENT_RATE payments/s in groups every
100 ms, as an instance's writer does (a read transaction after a commit
starts from an empty page cache). And the rebuild's time, median of REPEATS.

Run: .venv/bin/python perf/bench_recent_ledger.py (or make bench-recent)
"""
from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench_record import synthetic
from report import percentile

from paycore.core.recent_ledger import RecentLedger
from paycore.core.record_reader import InlineReads
from paycore.service.store.embedded import record_sql

HOUR_MS = 3_600_000
BATCH = 20_000
READ_GAP_S = 0.005
COMMIT_INTERVAL_S = 0.1
REPEATS = 5
RANGES = {"checker": (15_000, 2_000), "hour": (HOUR_MS - 7, 2_000)}
REPO = Path(__file__).resolve().parents[1]


def fill(connection, rng: random.Random, now_ms: int, rate: float) -> int:
    """An hour of payments up to now_ms, committed in batches; the last sequence."""
    total = int(rate * HOUR_MS / 1000)
    seq = 0
    for first in range(0, total, BATCH):
        seq += 1
        count = min(BATCH, total - first)
        record_sql.commit_settlements(connection, "bench", synthetic(
            rng, count, now_ms - HOUR_MS + first * HOUR_MS // total, count * HOUR_MS // total, seq), seq)
    return seq


def timed_us(read, repeats: int, gap_s: float = 0.0) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        read()
        samples.append((time.perf_counter_ns() - started) / 1000)
        if gap_s:
            time.sleep(gap_s)
    return sorted(samples)


def commit_while(path: str, rate: float, seq: int, stop: threading.Event) -> None:
    """Commit rate payments/s at the current time, in groups every COMMIT_INTERVAL_S, until stop."""
    connection = record_sql.connect_writer(path)
    rng = random.Random(2)
    while not stop.wait(COMMIT_INTERVAL_S):
        seq += 1
        now_ms = time.time_ns() // 1_000_000
        rows = synthetic(rng, int(rate * COMMIT_INTERVAL_S), now_ms - int(COMMIT_INTERVAL_S * 1000),
                         int(COMMIT_INTERVAL_S * 1000), seq)
        record_sql.commit_settlements(connection, "writer", rows, seq)
    connection.close()


def quantiles(samples: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(samples), 2), "p99": round(percentile(samples, 0.99), 2)}


def main() -> None:
    rate = float(os.environ.get("RECENT_RATE", "600"))
    queries = int(os.environ.get("RECENT_QUERIES", "3000"))
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=REPO) as scratch, tempfile.TemporaryDirectory(dir="/dev/shm") as shared:
        path = os.path.join(scratch, "payments.db")
        connection = record_sql.connect_writer(path)
        now_ms = time.time_ns() // 1_000_000
        seq = fill(connection, rng, now_ms, rate)
        inline = InlineReads(path, record_sql.SUMMARY_STATEMENTS)
        with RecentLedger(shared, "bench", path, record_sql.RECENT_REBUILD_STATEMENTS) as recent:
            rebuild_s = []
            for _ in range(REPEATS):
                recent.stale_unless(seq + 1)
                started = time.perf_counter()
                assert recent.add(seq, seq, [], now_ms) == 0
                rebuild_s.append(time.perf_counter() - started)

            def through_recent(from_ms: int, to_ms: int) -> tuple[int, ...]:
                totals, _, covered_from, _ = recent.totals(0, from_ms, to_ms)
                if covered_from > from_ms:
                    _, edge, _ = inline.summary(*record_sql.edges_query(0, [(from_ms, covered_from - 1)]))
                    totals = tuple(a + b for a, b in zip(totals, edge))
                return totals

            def through_record(from_ms: int, to_ms: int) -> tuple[int, ...]:
                return inline.summary(*record_sql.summary_query(0, from_ms, to_ms))[1]

            report = {"rate": rate, "payments": int(rate * HOUR_MS / 1000),
                      "rebuild_s": round(statistics.median(rebuild_s), 3)}
            for name, (from_before, to_before) in RANGES.items():
                bounds = (now_ms - from_before, now_ms - to_before)
                assert through_recent(*bounds) == through_record(*bounds), name
                for way, read in (("recent", through_recent), ("record", through_record)):
                    report[f"{name}_{way}_us"] = quantiles(timed_us(lambda: read(*bounds), queries))
            stop = threading.Event()
            writer = threading.Thread(target=commit_while, args=(path, rate, seq, stop))
            writer.start()
            try:
                from_before, to_before = RANGES["hour"]
                report["hour_recent_beside_commits_us"] = quantiles(timed_us(
                    lambda: through_recent(now_ms - from_before, now_ms - to_before), queries // 3, READ_GAP_S))
            finally:
                stop.set()
                writer.join()
        inline.close()
        connection.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
