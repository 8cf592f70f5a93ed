"""The payments record (service/store/embedded/record.py): exact summaries
against a brute-force model, once per correlationId at any age, committed
sequences, purge generations, retention, crashes and two writers on one file."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import record_writer
from paycore.service.config import Settings
from paycore.service.payment import Attempt, Payment
from paycore.service.store.base import resolve
from paycore.service.store.embedded import record as record_module
from paycore.service.store.embedded import record_sql
from paycore.service.store.embedded.record import PaymentsRecord, RecordError, Settlement
from paycore.service.store.embedded.record_ranges import LEVEL_WIDTHS_MS, plan_range

DAY_MS = 86_400_000
BASE_MS = 1_752_537_600_000  # 2025-07-15T00:00:00Z, a day boundary
MAX_CENTS = 99_999_999_999_999  # 999,999,999,999.99
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
WAIT_S = 30  # for anything a test awaits: a bug fails, never hangs


class Model:
    """The record by brute force: the first settlement of each id, summed."""

    def __init__(self) -> None:
        self.payments: dict[bytes, Settlement] = {}

    def add(self, settlements) -> None:
        for settlement in settlements:
            self.payments.setdefault(settlement.correlation_id, settlement)

    def summary(self, generation, from_ms, to_ms, floor_ms=None):
        totals = [0, 0, 0, 0]
        for payment in self.payments.values():
            at = payment.requested_at_ms
            if (payment.generation == generation and (from_ms is None or at >= from_ms)
                    and (to_ms is None or at <= to_ms) and (floor_ms is None or at >= floor_ms)):
                totals[2 * payment.processor] += 1
                totals[2 * payment.processor + 1] += payment.cents
        return tuple(totals)


def model_of(settlements) -> Model:
    model = Model()
    model.add(settlements)
    return model


class Commits:
    """on_committed's calls, awaitable."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self._changed = asyncio.Event()

    def __call__(self, seq: int) -> None:
        self.seqs.append(seq)
        self._changed.set()

    async def reach(self, seq: int) -> None:
        await until_set(self._changed, lambda: bool(self.seqs) and self.seqs[-1] >= seq)


async def until_set(changed: asyncio.Event, condition) -> None:
    """Until condition() holds, asked again each time `changed` is set."""
    async def wait() -> None:
        while not condition():
            changed.clear()
            await changed.wait()
    await asyncio.wait_for(wait(), WAIT_S)


@contextlib.asynccontextmanager
async def running(path, instance="1", **options):
    record = PaymentsRecord(str(path), instance, str(path.parent), sync=options.pop("sync", False), **options)
    record.open()
    commits = Commits()
    record.start(asyncio.get_running_loop(), commits)
    try:
        yield record, commits
    finally:
        await record.close()


async def summed(answer) -> tuple[tuple[int, int, int, int], dict[str, int]]:
    """A summary's reads put together: their totals, and the committed
    sequences of the last (the record's own, where it was read)."""
    reads = await resolve(answer)
    return tuple(map(sum, zip(*(read.totals for read in reads)))), reads[-1].committed


def opened(path, instance="1", **options) -> PaymentsRecord:
    record = PaymentsRecord(str(path), instance, str(path.parent), sync=False, **options)
    record.open()
    return record


def close(record: PaymentsRecord) -> None:
    asyncio.run(record.close())


def settlement(rng, at_ms, generation=0, seq=0, cents=None) -> Settlement:
    return Settlement(rng.randbytes(16), cents or rng.randint(1, 10**7), rng.randint(0, 1), at_ms, generation, seq)


def interesting_time(rng, span_ms) -> int:
    """Anywhere in the span, or on (or next to) a bucket boundary of some width."""
    at = BASE_MS + rng.randrange(span_ms)
    if rng.random() < 0.5:
        width = rng.choice(LEVEL_WIDTHS_MS)
        at = at // width * width + rng.choice((-1, 0, 0, 1))
    return at


def random_bound(rng, times):
    choice = rng.random()
    if choice < 0.1:
        return None
    if choice < 0.15:
        return rng.choice((INT64_MIN, INT64_MAX))
    if choice < 0.6:
        return rng.choice(times) + rng.choice((-1, 0, 0, 1))
    return interesting_time(rng, 3 * DAY_MS)


# The range plan, on its own.

@pytest.mark.parametrize("seed", range(4))
def test_a_range_plan_covers_the_range_exactly_once(seed):
    rng = random.Random(seed)
    for _ in range(2000):
        scale = rng.choice((20, 2_000, 200_000, 20 * 3_600_000, 30 * DAY_MS))
        from_ms = rng.choice((interesting_time(rng, 3 * DAY_MS), rng.randrange(-scale, scale)))
        to_ms = from_ms + rng.randrange(-5, scale)
        plan = plan_range(from_ms, to_ms)
        pieces = [(start, last + LEVEL_WIDTHS_MS[level] - 1) for level, start, last in plan.buckets] + list(plan.edges)
        pieces.sort()
        if from_ms > to_ms:
            assert pieces == [], f"seed {seed}: {from_ms}..{to_ms}"
            continue
        # Contiguous, disjoint, from from_ms to to_ms: every ms counted once.
        assert pieces[0][0] == from_ms and pieces[-1][1] == to_ms, f"seed {seed}: {from_ms}..{to_ms} {plan}"
        for (_, end), (start, _) in zip(pieces, pieces[1:]):
            assert start == end + 1, f"seed {seed}: {from_ms}..{to_ms} {plan}"
        for level, start, last in plan.buckets:
            width = LEVEL_WIDTHS_MS[level]
            assert start % width == 0 and last % width == 0 and start <= last, f"seed {seed}: {plan}"
            if level + 1 < len(LEVEL_WIDTHS_MS):  # a run never holds a whole coarser bucket...
                assert (last - start) // width + 1 < 2 * LEVEL_WIDTHS_MS[level + 1] // width, f"seed {seed}: {plan}"
        for start, end in plan.edges:  # ...and an edge never holds a whole finest bucket
            narrower = LEVEL_WIDTHS_MS[0] if plan.buckets else 2 * LEVEL_WIDTHS_MS[0] - 1
            assert end - start + 1 < narrower, f"seed {seed}: {plan}"
        assert len(plan.edges) <= 2 and len(plan.buckets) <= 2 * len(LEVEL_WIDTHS_MS) - 1


@pytest.mark.parametrize("seed", range(3))
def test_summing_a_plans_pieces_gives_the_brute_force_sum(seed):
    rng = random.Random(seed)
    times = [interesting_time(rng, 3 * DAY_MS) for _ in range(1000)]
    for _ in range(300):
        from_ms, to_ms = sorted((random_bound(rng, times) or BASE_MS, random_bound(rng, times) or BASE_MS))
        plan = plan_range(from_ms, to_ms)
        by_plan = 0
        for at in times:
            by_plan += sum(start <= at // LEVEL_WIDTHS_MS[level] * LEVEL_WIDTHS_MS[level] <= last
                           for level, start, last in plan.buckets)
            by_plan += sum(start <= at <= end for start, end in plan.edges)
        assert by_plan == sum(from_ms <= at <= to_ms for at in times), f"seed {seed}: {from_ms}..{to_ms}"


# Summaries and duplicates.

@pytest.mark.parametrize("seed", range(3))
def test_summaries_equal_brute_force_over_random_payments_and_ranges(tmp_path, seed):
    rng = random.Random(seed)
    model = Model()

    async def scenario():
        async with running(tmp_path / "payments.db") as (record, commits):
            seq = 0
            for _ in range(40):
                batch = [settlement(rng, interesting_time(rng, 3 * DAY_MS), rng.choice((0, 0, 1)))
                         for _ in range(rng.randint(0, 300))]
                # Duplicates: within the batch and of earlier batches, some with
                # another amount, processor or time: none counts again.
                known = list(model.payments.values())
                for _ in range(rng.randint(0, 20)):
                    if known:
                        twin = rng.choice(known)
                        batch.append(twin._replace(cents=twin.cents + 1, requested_at_ms=twin.requested_at_ms + 5))
                    if batch:
                        batch.append(rng.choice(batch)._replace(processor=1))
                rng.shuffle(batch)
                seq += 1
                record.submit(batch, seq)
                model.add(batch)
            await commits.reach(seq)
            times = [payment.requested_at_ms for payment in model.payments.values()]
            for _ in range(300):
                generation = rng.choice((0, 1))
                from_ms, to_ms = random_bound(rng, times), random_bound(rng, times)
                totals, committed = await summed(record.summary(generation, from_ms, to_ms))
                assert totals == model.summary(generation, from_ms, to_ms), (
                    f"seed {seed}: generation {generation} [{from_ms}, {to_ms}]")
                assert committed == {"1": seq}
    asyncio.run(scenario())


def test_both_bounds_are_inclusive_and_none_is_unbounded(tmp_path):
    at = BASE_MS + 123_456_789  # inside buckets of every width but the day
    payments = [Settlement(uuid.uuid4().bytes, cents, 0, at + offset, 0, 1)
                for offset, cents in ((-1, 1), (0, 10), (1, 100))]

    async def scenario():
        async with running(tmp_path / "payments.db") as (record, commits):
            record.submit(payments, 1)
            await commits.reach(1)
            for (from_ms, to_ms), (count, cents) in [
                    ((at, at), (1, 10)), ((at - 1, at), (2, 11)), ((at, at + 1), (2, 110)),
                    ((None, at), (2, 11)), ((at, None), (2, 110)), ((None, None), (3, 111)),
                    ((at + 2, None), (0, 0)), ((at + 1, at - 1), (0, 0))]:
                assert (await summed(record.summary(0, from_ms, to_ms)))[0] == (count, cents, 0, 0), (from_ms, to_ms)
    asyncio.run(scenario())


def test_sums_are_exact_past_int64(tmp_path):
    count = 100_000
    record = opened(tmp_path / "payments.db")
    record.record_recovered([Settlement(i.to_bytes(16, "big"), MAX_CENTS, i % 2, BASE_MS + 3 + i * 7, 0, i)
                             for i in range(count)], count)
    assert count * MAX_CENTS > INT64_MAX
    connection = sqlite3.connect(tmp_path / "payments.db")
    assert connection.execute("SELECT max(cents_low) FROM buckets").fetchone()[0] < 2**32
    connection.close()

    async def scenario():
        record.start(asyncio.get_running_loop(), lambda seq: None)
        half = count // 2
        assert (await summed(record.summary(0, None, None)))[0] == (half, half * MAX_CENTS, half, half * MAX_CENTS)
        # Edges and runs at every width: all but the first and last payment.
        totals, _ = await summed(record.summary(0, BASE_MS + 4, BASE_MS + 3 + (count - 1) * 7 - 1))
        assert totals == (half - 1, (half - 1) * MAX_CENTS, half - 1, (half - 1) * MAX_CENTS)
        await record.close()
    asyncio.run(scenario())


def test_a_purge_starts_summaries_of_a_new_generation_and_never_pays_twice(tmp_path):
    rng = random.Random(7)
    before = [settlement(rng, BASE_MS + i, 0, 1) for i in range(50)]

    async def scenario():
        async with running(tmp_path / "payments.db") as (record, commits):
            record.submit(before, 1)
            await commits.reach(1)
            assert await record.purge() == 1
            assert (await summed(record.summary(1, None, None)))[0] == (0, 0, 0, 0)
            after = [settlement(rng, BASE_MS + 100 + i, 1, 2) for i in range(20)]
            repeated = [payment._replace(generation=1) for payment in before[:10]]
            record.submit(after + repeated, 2)
            await commits.reach(2)
            model = Model()
            model.add(before + after)
            assert (await summed(record.summary(1, None, None)))[0] == model.summary(1, None, None)
            assert (await summed(record.summary(0, None, None)))[0] == model.summary(0, None, None)
            found = await record.lookup([payment.correlation_id for payment in repeated])
            assert {cid: attempt.payment.cents for cid, attempt in found.items()} == {
                payment.correlation_id: payment.cents for payment in before[:10]}
            assert await record.purge() == 2
    asyncio.run(scenario())
    reopened = opened(tmp_path / "payments.db")
    assert reopened.generation() == 2  # durable
    close(reopened)


# Committed sequences.

def test_each_instance_has_its_committed_sequence_and_empty_batches_advance_it(tmp_path):
    path = tmp_path / "payments.db"
    rng = random.Random(3)

    async def scenario():
        async with running(path, "a") as (a, a_commits), running(path, "b") as (b, b_commits):
            a.submit([settlement(rng, BASE_MS)], 5)
            b.submit([], 9)
            await a_commits.reach(5)
            await b_commits.reach(9)
            a.submit([], 4)  # a lower sequence never moves it back
            a.submit([], 12)
            await a_commits.reach(12)
            _, committed = await summed(b.summary(0, None, None))
            assert committed == {"a": 12, "b": 9}
            assert a_commits.seqs[-1] == 12 and b_commits.seqs == [9]
    asyncio.run(scenario())
    a, b = opened(path, "a"), opened(path, "b")
    assert (a.committed_seq(), b.committed_seq(), opened(path, "c").committed_seq()) == (12, 9, 0)
    close(a), close(b)


def test_the_first_instance_to_commit_a_correlation_id_holds_it(tmp_path):
    path = tmp_path / "payments.db"
    first = Settlement(uuid.uuid4().bytes, 100, 0, BASE_MS, 0, 1)
    second = first._replace(cents=200, processor=1, requested_at_ms=BASE_MS + 7_000)

    async def scenario():
        async with running(path, "a") as (a, a_commits), running(path, "b") as (b, b_commits):
            a.submit([first], 1)
            await a_commits.reach(1)
            b.submit([second], 1)
            await b_commits.reach(1)
            for record in (a, b):
                assert (await summed(record.summary(0, None, None)))[0] == (1, 100, 0, 0)
                assert await record.lookup([first.correlation_id]) == {
                    first.correlation_id: Attempt(Payment(first.correlation_id, 100), 0, BASE_MS)}
    asyncio.run(scenario())


def test_close_commits_what_was_submitted_and_a_reopened_record_has_it_all(tmp_path):
    rng = random.Random(11)
    model = Model()

    async def scenario():
        record = opened(tmp_path / "payments.db")
        commits = Commits()
        record.start(asyncio.get_running_loop(), commits)
        for seq in range(1, 6):
            batch = [settlement(rng, BASE_MS + rng.randrange(DAY_MS), 0, seq) for _ in range(100)]
            record.submit(batch, seq)
            model.add(batch)
        await record.close()
        assert commits.seqs[-1] == 5
    asyncio.run(scenario())
    record = opened(tmp_path / "payments.db")
    assert record.committed_seq() == 5
    assert len(record.settled_among(list(model.payments))) == 500

    async def check():
        record.start(asyncio.get_running_loop(), lambda seq: None)
        assert (await summed(record.summary(0, None, None)))[0] == model.summary(0, None, None)
        await record.close()
    asyncio.run(check())


def test_recovered_settlements_commit_at_once_and_count_once(tmp_path):
    rng = random.Random(5)
    payments = [settlement(rng, BASE_MS + i * 3, 0, i) for i in range(1, 301)]
    record = opened(tmp_path / "payments.db")
    record.record_recovered(payments[:200], 200)
    record.record_recovered(payments[100:], 300)  # a replay that overlaps what is in
    assert record.committed_seq() == 300
    held = record.settled_among([payment.correlation_id for payment in payments] + [b"\0" * 16])
    assert held == {payment.correlation_id: Attempt(Payment(payment.correlation_id, payment.cents),
                                                    payment.processor, payment.requested_at_ms)
                    for payment in payments}
    model = Model()
    model.add(payments)

    async def check():
        record.start(asyncio.get_running_loop(), lambda seq: None)
        assert (await summed(record.summary(0, None, None)))[0] == model.summary(0, None, None)
        with pytest.raises(RuntimeError):
            record.record_recovered([], 301)  # only before start
        await record.close()
    asyncio.run(check())


# Lookups.

def test_lookups_find_what_is_settled_and_batch_many_ids(tmp_path):
    rng = random.Random(13)
    payments = [settlement(rng, BASE_MS + i, 0, 1) for i in range(700)]
    unknown = [rng.randbytes(16) for _ in range(300)]

    async def scenario():
        async with running(tmp_path / "payments.db") as (record, commits):
            record.submit(payments, 1)
            await commits.reach(1)
            wanted = [payment.correlation_id for payment in payments] + unknown
            rng.shuffle(wanted)
            found = await record.lookup(wanted)
            assert len(found) == 700
            sample = payments[123]
            assert found[sample.correlation_id] == Attempt(
                Payment(sample.correlation_id, sample.cents), sample.processor, sample.requested_at_ms)
            # Lookups asked together are answered together, each with its own ids.
            asked = [[payment.correlation_id for payment in payments[i:i + 3]] + unknown[i:i + 2]
                     for i in range(0, 300, 3)]
            answers = await asyncio.gather(*(record.lookup(ids) for ids in asked))
            for ids, answer in zip(asked, answers):
                assert sorted(answer) == sorted(ids[:3])
            assert await record.lookup([]) == {}
    asyncio.run(scenario())


def test_a_record_in_memory_tells_at_once_what_it_holds_one_on_disk_defers(tmp_path, memory_path):
    rng = random.Random(17)
    payments = [settlement(rng, BASE_MS + i, 0, 1) for i in range(50)]
    unknown = [rng.randbytes(16) for _ in range(50)]

    async def scenario(directory, at_once):
        async with running(directory / "payments.db") as (record, commits):
            assert record.holds_now(payments[0].correlation_id) is (False if at_once else None)
            record.submit(payments, 1)
            await commits.reach(1)
            told = {correlation_id: record.holds_now(correlation_id)
                    for correlation_id in [payment.correlation_id for payment in payments] + unknown}
            if at_once:
                assert told == {**{payment.correlation_id: True for payment in payments},
                                **{correlation_id: False for correlation_id in unknown}}
            else:
                assert set(told.values()) == {None}
    asyncio.run(scenario(memory_path, at_once=True))
    asyncio.run(scenario(tmp_path, at_once=False))


# Retention.

def test_summaries_are_read_at_once_where_no_read_waits_for_a_device(tmp_path, memory_path):
    """A record in memory sums any range at once; one on a disk a range that
    starts within RECENT_SUMMARY_MS (its pages were written since: in the
    page cache), and any older one on the reader thread. Both give the same
    totals."""
    rng = random.Random(23)
    now_ms = BASE_MS + 10 * DAY_MS
    recent = record_module.RECENT_SUMMARY_MS
    payments = [settlement(rng, now_ms - rng.randrange(2 * recent), 0, 1) for _ in range(200)]
    model = Model()
    model.add(payments)
    ranges = [(now_ms - recent, None), (now_ms - 15_000, now_ms - 2_000), (now_ms - recent - 1, now_ms),
              (None, now_ms), (BASE_MS, None)]

    async def scenario(directory, in_memory):
        async with running(directory / "payments.db", clock_ms=lambda: now_ms) as (record, commits):
            record.submit(payments, 1)
            await commits.reach(1)
            for from_ms, to_ms in ranges:
                answer = record.summary(0, from_ms, to_ms)
                at_once = in_memory or (from_ms is not None and from_ms >= now_ms - recent)
                assert isinstance(answer, asyncio.Future) is not at_once, (in_memory, from_ms, to_ms)
                assert (await summed(answer))[0] == model.summary(0, from_ms, to_ms), (in_memory, from_ms, to_ms)
    asyncio.run(scenario(memory_path, in_memory=True))
    asyncio.run(scenario(tmp_path, in_memory=False))


def test_summaries_of_the_last_hour_are_summed_from_the_recent_ledger(tmp_path, monkeypatch):
    """Two instances of a host commit to one record on a disk. Each sums the
    other's commits too from the recent ledger, with no statement; only the
    milliseconds of a range that lie before its 1 ms ring take one, a small
    one. Older ranges are the record's, as before. All exact."""
    rng = random.Random(29)
    now_ms = BASE_MS + 10 * DAY_MS
    payments = [settlement(rng, now_ms - rng.randrange(2 * 3_600_000), 0, 1) for _ in range(400)]
    model = Model()
    model.add(payments)
    planned = []
    for name in ("summary_query", "edges_query"):
        def counted(*args, plan=getattr(record_sql, name), name=name):
            planned.append(name)
            return plan(*args)
        monkeypatch.setattr(record_sql, name, counted)
    ranges = {(now_ms - 15_000, now_ms - 2_000): [], (now_ms - 90_000, None): [],
              (now_ms - 3_600_000 + 3, now_ms - 1_800_000 + 1): ["edges_query"],
              (now_ms - 3_600_000 - 60_000, now_ms): ["summary_query"], (None, now_ms): ["summary_query"]}

    async def scenario():
        path = tmp_path / "payments.db"
        async with running(path, "a", clock_ms=lambda: now_ms) as (a, a_commits), \
                running(path, "b", clock_ms=lambda: now_ms) as (b, b_commits):
            a.submit(payments[:200], 1)
            await a_commits.reach(1)
            b.submit(payments[200:], 1)
            await b_commits.reach(1)
            for (from_ms, to_ms), statements in ranges.items():
                for record in (a, b):
                    planned.clear()
                    totals, committed = await summed(record.summary(0, from_ms, to_ms))
                    assert totals == model.summary(0, from_ms, to_ms), (from_ms, to_ms)
                    assert committed == {"a": 1, "b": 1}
                    assert planned == statements, (from_ms, to_ms)
    asyncio.run(scenario())


def test_retention_deletes_whole_days_and_summaries_stay_exact(tmp_path, monkeypatch):
    rng = random.Random(17)
    monkeypatch.setattr(record_module, "RETENTION_SLICE_ROWS", 7)  # many slices
    now = [BASE_MS + 5 * DAY_MS + 3_600_000]
    payments = [settlement(rng, BASE_MS + rng.randrange(6 * DAY_MS), 0, 1) for _ in range(600)]
    model = Model()
    model.add(payments)
    setup = opened(tmp_path / "payments.db")
    setup.record_recovered(payments, 1)
    close(setup)

    async def scenario():
        async with running(tmp_path / "payments.db", retention_days=2, clock_ms=lambda: now[0]) as (record, commits):
            floor = None
            for day in (3, 4):  # the cutoff: the day two days back, then a day later
                cutoff = BASE_MS + day * DAY_MS
                seq = commits.seqs[-1] if commits.seqs else 1
                for _ in range(1000):
                    # Between the writer's slices, whatever is left below the
                    # cutoff: the summary is exact over what is kept, the
                    # floor moving with the first slice of a cutoff.
                    from_ms = rng.choice((None, BASE_MS + rng.randrange(6 * DAY_MS)))
                    totals, _ = await summed(record.summary(0, from_ms, None))
                    assert totals in (model.summary(0, from_ms, None, floor),
                                      model.summary(0, from_ms, None, cutoff)), (day, from_ms)
                    old = await record.lookup([payment.correlation_id for payment in payments
                                               if payment.requested_at_ms < cutoff])
                    if not old:
                        break
                    seq += 1
                    record.submit([], seq)
                    await commits.reach(seq)
                floor = cutoff
                assert not old
                kept = await record.lookup(list(model.payments))
                assert set(kept) == {cid for cid, payment in model.payments.items()
                                     if payment.requested_at_ms >= cutoff}
                for _ in range(50):
                    from_ms = rng.choice((None, BASE_MS + rng.randrange(6 * DAY_MS)))
                    to_ms = rng.choice((None, BASE_MS + rng.randrange(6 * DAY_MS)))
                    assert (await summed(record.summary(0, from_ms, to_ms)))[0] == model.summary(0, from_ms, to_ms, cutoff)
                now[0] += DAY_MS
    asyncio.run(scenario())
    connection = sqlite3.connect(tmp_path / "payments.db")
    assert connection.execute("SELECT min(start_ms) FROM buckets").fetchone()[0] >= BASE_MS + 4 * DAY_MS
    connection.close()


def test_without_retention_nothing_is_ever_deleted(tmp_path):
    rng = random.Random(19)
    payments = [settlement(rng, BASE_MS - 400 * DAY_MS + i * DAY_MS, 0, 1) for i in range(400)]

    async def scenario():
        async with running(tmp_path / "payments.db", clock_ms=lambda: BASE_MS) as (record, commits):
            record.submit(payments, 1)
            await commits.reach(1)
            record.submit([], 2)
            await commits.reach(2)
            assert len(await record.lookup([payment.correlation_id for payment in payments])) == 400
    asyncio.run(scenario())


# Files, processes, crashes.

def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    close(opened(tmp_path / "payments.db"))
    connection = sqlite3.connect(tmp_path / "payments.db")
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (record_sql.SCHEMA_VERSION + 1,))
    connection.commit()
    connection.close()
    with pytest.raises(RecordError, match="newer than this version of paycore"):
        opened(tmp_path / "payments.db")


def test_the_view_shows_payments_as_an_operator_reads_them(tmp_path):
    rng = random.Random(23)
    payments = [settlement(rng, BASE_MS + rng.randrange(-10**12, 10**12), 0, 1, rng.randint(1, MAX_CENTS))
                for _ in range(500)] + [Settlement(uuid.uuid4().bytes, MAX_CENTS, 1, BASE_MS, 0, 1),
                                        Settlement(uuid.uuid4().bytes, 5, 0, BASE_MS + 999, 0, 1)]
    record = opened(tmp_path / "payments.db")
    record.record_recovered(payments, 1)
    close(record)
    connection = sqlite3.connect(tmp_path / "payments.db")
    rows = {row[0]: row[1:] for row in connection.execute("SELECT * FROM settled_payments")}
    connection.close()
    for payment in payments:
        at = datetime.datetime.fromtimestamp(payment.requested_at_ms / 1000, datetime.timezone.utc)
        assert rows[str(uuid.UUID(bytes=payment.correlation_id))] == (
            f"{payment.cents // 100}.{payment.cents % 100:02d}", ("default", "fallback")[payment.processor],
            at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{payment.requested_at_ms % 1000:03d}Z", 0,
            payment.requested_at_ms)


def read_committed(process: subprocess.Popen, until) -> list[int]:
    """Committed sequences a record_writer prints, until until(seqs) or it exits."""
    seqs: list[int] = []
    deadline = time.monotonic() + WAIT_S
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not until(seqs):
            assert selector.select(max(0.0, deadline - time.monotonic())), "record_writer went silent"
            line = process.stdout.readline()
            if not line:
                break
            seqs.append(int(line))
    return seqs


def start_writer(path, instance, batches) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(record_writer.__file__)), str(path), instance, str(batches)],
                            stdout=subprocess.PIPE, text=True)


def assert_holds_exactly(path, instances: dict[str, int]) -> None:
    """The record holds batches 1..n of the instances' highest n, and nothing
    else, with buckets that add up to them."""
    through = max(instances.values())
    model = Model()
    for seq in range(1, through + 1):
        model.add(record_writer.batch(seq))
    for instance, seq in instances.items():
        record = opened(path, instance)
        assert record.committed_seq() == seq
        close(record)
    record = opened(path, "check")
    assert len(record.settled_among(list(model.payments))) == len(model.payments)
    assert not record.settled_among(
        [payment.correlation_id for payment in record_writer.batch(through + 1)])
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT count(*) FROM payments").fetchone()[0] == len(model.payments)
    connection.close()

    async def check():
        record.start(asyncio.get_running_loop(), lambda seq: None)
        assert (await summed(record.summary(0, None, None)))[0] == model.summary(0, None, None)
        for from_ms in range(record_writer.BASE_MS, record_writer.BASE_MS + through * 37, 997):
            assert (await summed(record.summary(0, from_ms, from_ms + 5003)))[0] == model.summary(0, from_ms, from_ms + 5003)
        await record.close()
    asyncio.run(check())


def test_a_process_killed_in_the_middle_of_commits_leaves_the_committed_prefix(tmp_path):
    path = tmp_path / "payments.db"
    for kill_after in (30, 90):
        process = start_writer(path, "1", 100_000)
        seen = read_committed(process, lambda seqs: bool(seqs) and seqs[-1] >= kill_after)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        record = opened(path)
        committed = record.committed_seq()
        close(record)
        assert committed >= seen[-1]
        assert_holds_exactly(path, {"1": committed})


def test_two_instances_write_one_file_at_once(tmp_path):
    path = tmp_path / "payments.db"
    writers = [start_writer(path, instance, 150) for instance in ("1", "2")]
    for writer in writers:
        read_committed(writer, lambda seqs: False)
        assert writer.wait() == 0
        writer.stdout.close()
    # Both settled the same payments: each is held, and counted, once.
    assert_holds_exactly(path, {"1": 150, "2": 150})


def test_retention_is_configured_in_whole_days(monkeypatch):
    assert Settings().retention_days == 0
    monkeypatch.setenv("PAYCORE_RETENTION_DAYS", "400")
    assert Settings().retention_days == 400
    monkeypatch.setenv("PAYCORE_RETENTION_DAYS", "-1")
    with pytest.raises(SystemExit, match="PAYCORE_RETENTION_DAYS"):
        Settings()


def test_with_sync_a_commit_is_reported_once_the_wal_holding_it_is_synced(tmp_path, monkeypatch):
    """The journal deletes what a reported commit holds: with sync, only a
    commit that an fdatasync of the WAL made durable is reported."""
    path = tmp_path / "payments.db"
    rng = random.Random(11)
    events = []
    real_fdatasync = record_module.os.fdatasync

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        events.append(("synced", Path(f"/proc/self/fd/{fd}").resolve().name))

    monkeypatch.setattr(record_module.os, "fdatasync", fdatasync)

    async def scenario():
        async with running(path, sync=True) as (record, commits):
            record.submit([settlement(rng, BASE_MS)], 3)
            await commits.reach(3)
            events.append(("reported", commits.seqs[-1]))
            record.submit([settlement(rng, BASE_MS + 1)], 7)
            await commits.reach(7)
            events.append(("reported", commits.seqs[-1]))
    asyncio.run(scenario())
    assert events == [("synced", "payments.db-wal"), ("reported", 3), ("synced", "payments.db-wal"), ("reported", 7)]


class LoggedErrors(logging.Handler):
    """The record's error logs, awaitable from the loop: the writer thread logs them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []
        self._loop = loop
        self._logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._loop.call_soon_threadsafe(self._logged.set)

    async def reach(self, count: int) -> None:
        await until_set(self._logged, lambda: len(self.messages) >= count)


@contextlib.contextmanager
def logged_errors(loop: asyncio.AbstractEventLoop):
    handler = LoggedErrors(loop)
    logger = logging.getLogger("paycore.record")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_a_commit_that_fails_is_retried_reported_only_once_it_lands_and_counts_once(tmp_path, monkeypatch):
    """Another connection holds the write lock past the writer's busy timeout,
    as a stuck writer on the same file would: each commit fails, nothing
    is reported (the journal keeps its segments), and once the lock goes the
    batches held back land together, each payment once."""
    monkeypatch.setattr(record_sql, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(record_module, "RETRY_MIN_S", 0.01)
    path = tmp_path / "payments.db"
    rng = random.Random(17)
    model = Model()
    first = [settlement(rng, BASE_MS + i, 0, 1) for i in range(50)]
    # Five of them settled again (by another instance, say): held once, as first settled.
    again = [payment._replace(cents=payment.cents + 1, journal_seq=2) for payment in first[:5]]
    held_back = [settlement(rng, BASE_MS + 100 + i, 0, 2) for i in range(50)] + again
    later = [settlement(rng, BASE_MS + 200 + i, 0, 3) for i in range(50)]

    async def scenario():
        async with running(path) as (record, commits):
            with logged_errors(asyncio.get_running_loop()) as errors:
                record.submit(first, 1)
                model.add(first)
                await commits.reach(1)
                blocker = sqlite3.connect(path, isolation_level=None)
                blocker.execute("BEGIN IMMEDIATE")
                record.submit(held_back, 2)
                model.add(held_back)
                await errors.reach(2)
                record.submit(later, 3)
                model.add(later)
                await errors.reach(3)
                assert commits.seqs == [1]
                assert (await summed(record.summary(0, None, None))) == (model_of(first).summary(0, None, None),
                                                                        {"1": 1})
                blocker.execute("ROLLBACK")
                blocker.close()
                await commits.reach(3)
                assert all("commit failed, retrying" in message for message in errors.messages)
            assert (await summed(record.summary(0, None, None))) == (model.summary(0, None, None), {"1": 3})
            held = await record.lookup(list(model.payments))
            assert {correlation_id: attempt.payment.cents for correlation_id, attempt in held.items()} == {
                correlation_id: payment.cents for correlation_id, payment in model.payments.items()}
    asyncio.run(scenario())


def test_a_wal_sync_that_fails_is_tried_again_and_nothing_is_reported_before(tmp_path, monkeypatch):
    """With sync, a commit is reported once an fdatasync of the WAL holds it:
    a sync that fails (an I/O error of the device) reports nothing, and the
    next sync, a SYNC_INTERVAL_S later, reports it."""
    monkeypatch.setattr(record_module, "SYNC_INTERVAL_S", 0.05)
    path = tmp_path / "payments.db"
    rng = random.Random(19)
    events = []
    real_fdatasync = record_module.os.fdatasync

    def fdatasync(fd: int) -> None:
        if not any(event == "failed" for event in events):
            events.append("failed")
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)
        events.append("synced")

    monkeypatch.setattr(record_module.os, "fdatasync", fdatasync)

    async def scenario():
        async with running(path, sync=True) as (record, commits):
            with logged_errors(asyncio.get_running_loop()) as errors:
                record.submit([settlement(rng, BASE_MS)], 4)
                await commits.reach(4)
                events.append(("reported", commits.seqs[-1]))
            assert ["syncing the WAL failed" in message for message in errors.messages] == [True]
    asyncio.run(scenario())
    assert events == ["failed", "synced", ("reported", 4)]
