"""The recent ledger: the payments record's last hour in shared memory,
summed without a query, kept by the record's writers and rebuilt from the
record whenever it cannot be trusted."""
import contextlib
import mmap
import multiprocessing
import os
import struct

import pytest

from conftest import test_random
from paycore.core.recent_ledger import FILE_NAME, LEVEL_SLOTS, LEVEL_WIDTHS_MS, RecentLedger
from paycore.service.store.embedded import record_sql
from paycore.service.store.embedded.record_ranges import LEVEL_WIDTHS_MS as RECORD_WIDTHS_MS
from paycore.service.store.embedded.record_sql import Settlement

NOW_MS = 1_800_000_000_000
HOUR_MS = 3_600_000
ONE_MS_REACH = LEVEL_SLOTS[0] - 1   # how far back the 1 ms ring reaches from its newest millisecond
MAX_CENTS = 99_999_999_999_999
LAST_MINUTE = (NOW_MS - 60_000, NOW_MS)
SEQUENCE_OFFSET = 8 + 4 + 4 + 8 * 5 * 2  # RecentHeader.sequence (recent_ledger.pxd)


class Record:
    """A payments record on disk, one instance's commits to it, and a model
    of what it holds."""

    def __init__(self, directory, instance="a"):
        self.path = str(directory / "payments.db")
        self.connection = record_sql.connect_writer(self.path)
        self.instance = instance
        self.seq = 0
        self.rows: list[Settlement] = []

    def commit(self, settlements) -> tuple[int, int, list]:
        """Commit; (from_seq, through_seq, inserted) to hand to RecentLedger.add."""
        self.seq += 1
        inserted = record_sql.commit_settlements(self.connection, self.instance, settlements, self.seq)
        self.rows += inserted
        return self.seq - 1, self.seq, inserted

    def totals(self, from_ms, to_ms, generation=0):
        sums = [0, 0, 0, 0]
        for row in self.rows:
            at = row.requested_at_ms
            if row.generation == generation and from_ms <= at and (to_ms is None or at <= to_ms):
                sums[2 * row.processor] += 1
                sums[2 * row.processor + 1] += row.cents
        return tuple(sums)


def ledger_for(directory, record: Record, instance="a") -> RecentLedger:
    return RecentLedger(str(directory), instance, record.path, record_sql.RECENT_REBUILD_STATEMENTS)


@contextlib.contextmanager
def after_one_commit(tmp_path, memory_path, count):
    """A record and a recent ledger built from it at its first commit: count
    payments over the last minute."""
    record = Record(tmp_path)
    with ledger_for(memory_path, record) as ledger:
        ledger.add(*record.commit(settlements(test_random, count, span_ms=60_000)), NOW_MS)
        yield record, ledger


def recent_time(rng, span_ms=2 * HOUR_MS) -> int:
    """Within span_ms before NOW_MS, often on (or next to) a bucket boundary."""
    at = NOW_MS - rng.randrange(span_ms)
    if rng.random() < 0.5:
        width = rng.choice(LEVEL_WIDTHS_MS)
        at = at // width * width + rng.choice((-1, 0, 0, 1))
    return min(at, NOW_MS)


def settlements(rng, count, generation=0, span_ms=2 * HOUR_MS) -> list[Settlement]:
    return [Settlement(rng.randbytes(16), rng.randint(1, MAX_CENTS), rng.randint(0, 1), recent_time(rng, span_ms),
                       generation, 0) for _ in range(count)]


def test_its_widths_are_the_records_own_below_a_minute():
    assert LEVEL_WIDTHS_MS[0] == 1
    assert LEVEL_WIDTHS_MS[1:] == RECORD_WIDTHS_MS[:len(LEVEL_WIDTHS_MS) - 1]


def test_any_range_of_the_last_hour_is_exact_but_for_edges_before_the_1_ms_ring(tmp_path, memory_path):
    """Random payments over two hours, committed in batches, the first of
    which builds the file from the record; random ranges from 70 minutes
    back. A range that starts within the last hour is summed, exactly;
    what it leaves out is less than 10 ms at an end older than the 1 ms
    ring. Older ranges are left to the record."""
    record = Record(tmp_path)
    with ledger_for(memory_path, record) as ledger:
        for _ in range(6):
            assert ledger.add(*record.commit(settlements(test_random, 400)), NOW_MS) == 0
        for _ in range(3000):
            from_ms = NOW_MS - test_random.randrange(70 * 60_000)
            if test_random.random() < 0.3:
                from_ms = from_ms // 1000 * 1000 + test_random.choice((-1, 0, 1))
            to_ms = None if test_random.random() < 0.1 else from_ms + test_random.randrange(-5, 80 * 60_000)
            answer = ledger.totals(0, from_ms, to_ms)
            if from_ms < NOW_MS - HOUR_MS:
                continue  # the rings may still hold it, or not
            assert answer is not None, (from_ms, to_ms)
            totals, committed, covered_from, covered_to = answer
            assert committed == {"a": record.seq}
            assert totals == record.totals(covered_from, covered_to), (from_ms, to_ms, covered_from, covered_to)
            assert 0 <= covered_from - from_ms < 10 and (covered_from == from_ms) is (
                from_ms >= NOW_MS - ONE_MS_REACH or from_ms % 10 == 0), (from_ms, covered_from)
            if to_ms is None or to_ms >= NOW_MS - ONE_MS_REACH:
                assert covered_to == to_ms
            else:
                assert 0 <= to_ms - covered_to < 10, (to_ms, covered_to)
        assert ledger.totals(0, None, NOW_MS) is None
        assert ledger.totals(0, NOW_MS - 2 * HOUR_MS, None) is None


def test_a_rebuild_from_the_record_holds_what_the_adds_held(tmp_path, memory_path):
    record = Record(tmp_path)
    added = ledger_for(memory_path, record)
    for _ in range(4):
        added.add(*record.commit(settlements(test_random, 300)), NOW_MS)
    (tmp_path / "other").mkdir()
    rebuilt = ledger_for(tmp_path / "other", record)
    assert rebuilt.add(record.seq, record.seq, [], NOW_MS) == 0  # a new file: built from the record
    for _ in range(500):
        from_ms = NOW_MS - test_random.randrange(HOUR_MS)
        to_ms = from_ms + test_random.randrange(HOUR_MS)
        assert rebuilt.totals(0, from_ms, to_ms) == added.totals(0, from_ms, to_ms), (from_ms, to_ms)
    added.close()
    rebuilt.close()


def test_a_commit_it_did_not_count_makes_it_stale_until_the_next_add_rebuilds_it(tmp_path, memory_path):
    """An instance killed between a commit and its add: at its next start,
    the file does not hold its commits, so it is marked stale before the
    ledger tail drops what that run left; the next add builds it again."""
    with after_one_commit(tmp_path, memory_path, 50) as (record, ledger):
        record.commit(settlements(test_random, 50, span_ms=60_000))  # counted by nobody
        ledger.stale_unless(record.seq - 1)
        assert ledger.totals(0, *LAST_MINUTE) is not None  # it holds the record through the sequence it was told
    with ledger_for(memory_path, record) as ledger:
        ledger.stale_unless(record.seq)
        assert ledger.totals(0, *LAST_MINUTE) is None
        assert ledger.add(*record.commit(settlements(test_random, 50, span_ms=60_000)), NOW_MS) == 0
        totals, committed, *covered = ledger.totals(0, *LAST_MINUTE)
        assert totals == record.totals(*LAST_MINUTE) and committed == {"a": record.seq} and covered == list(LAST_MINUTE)


def test_an_add_that_does_not_follow_on_rebuilds_and_one_already_held_changes_nothing(tmp_path, memory_path):
    a, b = Record(tmp_path, "a"), Record(tmp_path, "b")
    with ledger_for(memory_path, a, "a") as ledger_a, ledger_for(memory_path, b, "b") as ledger_b:
        ledger_a.add(*a.commit(settlements(test_random, 20, span_ms=60_000)), NOW_MS)
        b_commit = b.commit(settlements(test_random, 20, span_ms=60_000))
        # a's next commit finds the file short of b's, rebuilds, and so holds b's too.
        skipped = a.commit(settlements(test_random, 20, span_ms=60_000))
        ledger_a.add(skipped[0] - 1, skipped[1], skipped[2], NOW_MS)
        ledger_b.add(*b_commit, NOW_MS)  # held already: counted once
        totals, committed, *_ = ledger_a.totals(0, *LAST_MINUTE)
        assert committed == {"a": a.seq, "b": b.seq}
        assert totals == tuple(x + y for x, y in zip(a.totals(*LAST_MINUTE), b.totals(*LAST_MINUTE)))


def test_a_writer_that_died_midway_leaves_it_unread_until_rebuilt(tmp_path, memory_path):
    with after_one_commit(tmp_path, memory_path, 50) as (record, ledger):
        with open(memory_path / FILE_NAME, "r+b") as file, mmap.mmap(file.fileno(), 4096) as header:
            sequence, = struct.unpack_from("<Q", header, SEQUENCE_OFFSET)
            assert sequence % 2 == 0
            struct.pack_into("<Q", header, SEQUENCE_OFFSET, sequence + 1)  # as a writer leaves it midway
            assert ledger.totals(0, *LAST_MINUTE) is None
            ledger.add(*record.commit(settlements(test_random, 50, span_ms=60_000)), NOW_MS)
            assert struct.unpack_from("<Q", header, SEQUENCE_OFFSET)[0] % 2 == 0
        assert ledger.totals(0, *LAST_MINUTE)[0] == record.totals(*LAST_MINUTE)


WRITER_BATCHES = 20_000


def batch_of(seq: int) -> list[Settlement]:
    """The payments a writer process adds with sequence seq: known to the reader."""
    return [Settlement(os.urandom(16), seq * 10 + index, (seq + index) % 2, NOW_MS - (seq * 7 + index) % 60_000, 0,
                       None) for index in range(3)]


def add_batches(tmp_path, memory_path, built) -> None:
    record = Record(tmp_path, "writer")
    with ledger_for(memory_path, record, "writer") as ledger:
        ledger.add(*record.commit(batch_of(1)), NOW_MS)
        built.set()
        for seq in range(2, WRITER_BATCHES + 1):
            ledger.add(seq - 1, seq, batch_of(seq), NOW_MS)


def test_a_reader_in_another_process_never_sees_half_of_an_add(tmp_path, memory_path):
    """One process adds batches as fast as it can while this one reads: every
    read is the totals of exactly the batches through the sequence it gives."""
    through = [(0, 0, 0, 0)]
    for seq in range(1, WRITER_BATCHES + 1):
        sums = list(through[-1])
        for row in batch_of(seq):
            sums[2 * row.processor] += 1
            sums[2 * row.processor + 1] += row.cents
        through.append(tuple(sums))
    context = multiprocessing.get_context("fork")
    built = context.Event()
    writer = context.Process(target=add_batches, args=(tmp_path, memory_path, built))
    writer.start()
    assert built.wait(30)
    unused_record = str(tmp_path / "not-read.db")  # a reader never rebuilds
    with RecentLedger(str(memory_path), "reader", unused_record, record_sql.RECENT_REBUILD_STATEMENTS) as reader:
        seqs = set()
        while writer.is_alive() or not seqs:
            answer = reader.totals(0, *LAST_MINUTE)
            if answer is None:
                continue  # a writer at work four reads in a row: a summary reads the record then
            totals, committed, *_ = answer
            assert totals == through[committed["writer"]], committed
            seqs.add(committed["writer"])
    writer.join()
    assert writer.exitcode == 0 and len(seqs) > 10, len(seqs)


def test_a_purge_counts_from_zero_and_what_was_settled_before_it_is_left_out(tmp_path, memory_path):
    with after_one_commit(tmp_path, memory_path, 30) as (record, ledger):
        generation = record_sql.next_generation(record.connection)
        ledger.raise_generation(generation)
        assert ledger.totals(0, *LAST_MINUTE) is None  # the file counts another generation now
        assert ledger.totals(generation, *LAST_MINUTE)[0] == (0, 0, 0, 0)
        late = settlements(test_random, 10, generation=0, span_ms=60_000)  # settled before the purge
        fresh = settlements(test_random, 10, generation=generation, span_ms=60_000)
        ledger.add(*record.commit(late + fresh), NOW_MS)
        counted = ledger.totals(generation, *LAST_MINUTE)[0]
        assert counted == record.totals(*LAST_MINUTE, generation=generation) != (0, 0, 0, 0)


def test_a_newer_generation_in_a_commit_counts_from_zero_before_its_purge_is_added(tmp_path, memory_path):
    with after_one_commit(tmp_path, memory_path, 30) as (record, ledger):
        generation = record_sql.next_generation(record.connection)
        ledger.add(*record.commit(settlements(test_random, 10, generation=generation, span_ms=60_000)), NOW_MS)
        ledger.raise_generation(generation)  # the purge's own add, later: nothing more to clear
        assert ledger.totals(generation, *LAST_MINUTE)[0] == record.totals(*LAST_MINUTE, generation=generation)


def test_sums_that_no_longer_fit_a_bucket_are_left_to_the_record(tmp_path, memory_path):
    record = Record(tmp_path)
    huge = (1 << 63) - 1
    with ledger_for(memory_path, record) as ledger:
        ledger.add(*record.commit([Settlement(os.urandom(16), 1, 0, NOW_MS - 5_000, 0, 0)]), NOW_MS)
        ledger.add(0, 0, [], NOW_MS)  # held already
        row = Settlement(None, huge, 1, NOW_MS - 1_000, 0, None)
        ledger.add(record.seq, record.seq + 1, [row] * 3, NOW_MS)  # past 2**64 - 1 cents
        assert ledger.totals(0, NOW_MS - 2_000, NOW_MS) is None
        assert ledger.totals(0, NOW_MS - 10_000, NOW_MS - 2_000)[0] == (1, 1, 0, 0)


def test_time_moving_on_empties_what_the_rings_drop(tmp_path, memory_path):
    """Buckets the rings have moved past are not read again as if they were
    the new ones in their slots."""
    record = Record(tmp_path)
    with ledger_for(memory_path, record) as ledger:
        ledger.add(*record.commit([Settlement(os.urandom(16), 7, 0, NOW_MS - 1, 0, 0)]), NOW_MS)
        later = NOW_MS + 2 * HOUR_MS - 1 + LEVEL_SLOTS[0]  # NOW_MS - 1 maps to this ring slot again
        ledger.add(*record.commit([Settlement(os.urandom(16), 5, 1, later, 0, 0)]), later)
        assert ledger.totals(0, later - 10, later)[0] == (0, 0, 1, 5)
        assert ledger.totals(0, later - HOUR_MS + 1, None)[0] == (0, 0, 1, 5)
        assert ledger.totals(0, NOW_MS - 10, NOW_MS) is None
        # Step by step: every level moves on by less than its ring at a time.
        at = later
        for step in (100_000, 31_077, 1_000_000, 2_000_000):
            at += step
            ledger.add(*record.commit([Settlement(os.urandom(16), 3, 0, at, 0, 0)]), at)
            assert ledger.totals(0, at - LEVEL_SLOTS[0] + 1, at)[0] == record.totals(at - LEVEL_SLOTS[0] + 1, at)
            assert ledger.totals(0, at - HOUR_MS, at)[0] == record.totals(at - HOUR_MS, at)


def test_a_range_after_everything_held_is_zero_and_needs_nothing_else(tmp_path, memory_path):
    with after_one_commit(tmp_path, memory_path, 10) as (record, ledger):
        assert ledger.totals(0, NOW_MS + 1, NOW_MS + 5_000) == ((0, 0, 0, 0), {"a": 1}, NOW_MS + 1, NOW_MS + 5_000)
        assert ledger.totals(0, NOW_MS + 5, NOW_MS + 1) == ((0, 0, 0, 0), {"a": 1}, NOW_MS + 5, NOW_MS + 1)


def test_a_bad_processor_is_refused_before_anything_changes(tmp_path, memory_path):
    with after_one_commit(tmp_path, memory_path, 10) as (record, ledger):
        before = ledger.totals(0, NOW_MS - 60_000, NOW_MS)
        with pytest.raises(ValueError, match="processor"):
            ledger.add(record.seq, record.seq + 1, [Settlement(None, 5, 2, NOW_MS, 0, None)], NOW_MS)
        assert ledger.totals(0, NOW_MS - 60_000, NOW_MS) == before
