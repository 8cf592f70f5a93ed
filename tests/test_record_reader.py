"""The record's reader thread (paycore.core.record_reader): lookups answered in
the order asked, found or absent as the record holds them, whatever the batch;
summaries as the statement they run reads them. And its inline reads, for a
record in memory: the same answers at once, and a lock never waited for."""
import os
import random
import select
import sqlite3
import threading

import pytest

from paycore.core.record_reader import InlineReads, LookupStatus, RecordReader
from paycore.service.store.embedded import record_sql
from paycore.service.store.embedded.record import Settlement

# The columns of record_sql's payments table that a lookup reads.
PAYMENTS_TABLE = ("CREATE TABLE payments (requested_at_ms INTEGER, correlation_id BLOB UNIQUE, "
                  "processor INTEGER, cents INTEGER, generation INTEGER)")
# A summary statement over that table: totals per processor, no instances.
PAYMENTS_BY_PROCESSOR = "SELECT NULL, processor, count(*), sum(cents), 0 FROM payments GROUP BY processor"


@pytest.fixture(params=["disk", "memory"])
def record(request, tmp_path):
    directory = request.getfixturevalue("memory_path") if request.param == "memory" else tmp_path
    path = str(directory / "payments.db")
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(PAYMENTS_TABLE)
    yield path, connection
    connection.close()


def collect(lookup: RecordReader, count: int) -> list:
    answers = []
    while len(answers) < count:
        ready, _, _ = select.select([lookup.event_fd], [], [], 10)
        assert ready, f"{count - len(answers)} answers never came"
        answers.extend(lookup.answers()[0])
    return answers


def served(lookup: RecordReader) -> threading.Thread:
    thread = threading.Thread(target=lookup.serve, daemon=True)
    thread.start()
    return thread


def settle_random(connection: sqlite3.Connection, rng: random.Random, held_count: int,
                  asked_count: int) -> tuple[dict[bytes, tuple[int, int, int]], list[bytes]]:
    """held_count random payments in the record, by id: (cents, processor,
    requestedAt); and asked_count ids to look up, about half of them held."""
    held = {rng.randbytes(16): (rng.randrange(1, 10**9), rng.randrange(2), rng.randrange(2**41))
            for _ in range(held_count)}
    connection.executemany("INSERT INTO payments VALUES (?, ?, ?, ?, 0)",
                           [(at, cid, processor, cents) for cid, (cents, processor, at) in held.items()])
    connection.commit()
    return held, [rng.choice(list(held)) if rng.random() < 0.5 else rng.randbytes(16) for _ in range(asked_count)]


def test_answers_come_in_the_order_asked_found_or_absent(record):
    path, connection = record
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    held, asked = settle_random(connection, rng, 500, 2000)
    lookup = RecordReader(path, [])
    thread = served(lookup)
    start = 0
    while start < len(asked):
        size = rng.choice((1, 3, 64, 400))
        lookup.ask(asked[start:start + size])
        start += size
    answers = collect(lookup, len(asked))
    lookup.stop()
    thread.join()
    lookup.close()
    for correlation_id, answer in zip(asked, answers, strict=True):
        assert answer[0] == correlation_id, f"seed {seed}"
        if correlation_id in held:
            cents, processor, at = held[correlation_id]
            assert answer[1:5] == (LookupStatus.FOUND, cents, processor, at), f"seed {seed}"
        else:
            assert answer[1] == LookupStatus.ABSENT, f"seed {seed}"


def test_a_settlement_committed_later_is_found_by_the_next_lookup(record):
    path, connection = record
    lookup = RecordReader(path, [])
    thread = served(lookup)
    correlation_id = os.urandom(16)
    lookup.ask([correlation_id])
    assert collect(lookup, 1)[0][1] == LookupStatus.ABSENT
    connection.execute("INSERT INTO payments VALUES (7, ?, 1, 1990, 0)", (correlation_id,))
    connection.commit()
    lookup.ask([correlation_id])
    assert collect(lookup, 1)[0][1:5] == (LookupStatus.FOUND, 1990, 1, 7)
    lookup.stop()
    thread.join()
    lookup.close()


def test_serve_answers_what_was_asked_before_stop_even_when_it_starts_late(record):
    path, _ = record
    lookup = RecordReader(path, [])
    ids = [os.urandom(16) for _ in range(100)]
    lookup.ask(ids)
    lookup.stop()
    lookup.serve()  # after stop(), as a thread may start late: answers, then returns
    assert [answer[0] for answer in lookup.answers()[0]] == ids
    lookup.close()
    with pytest.raises(RuntimeError):
        lookup.serve()


def test_an_id_is_sixteen_bytes_and_a_record_without_payments_is_refused(record, tmp_path):
    path, _ = record
    lookup = RecordReader(path, [])
    with pytest.raises(ValueError):
        lookup.ask([b"short"])
    lookup.close()
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(OSError, match="payments"):
        RecordReader(str(tmp_path / "empty.db"), [])


def test_the_inline_lookup_answers_at_once_as_the_reader_thread_does(record):
    path, connection = record
    seed = random.randrange(2**32)
    held, asked = settle_random(connection, random.Random(seed), 300, 1000)
    reader, inline = RecordReader(path, []), InlineReads(path, [])
    thread = served(reader)
    reader.ask(asked)
    from_thread = collect(reader, len(asked))
    reader.stop()
    thread.join()
    reader.close()
    at_once = [answer for start in range(0, len(asked), 7) for answer in inline.lookup(asked[start:start + 7])]
    inline.close()
    assert at_once == from_thread, f"seed {seed}"
    assert {answer[0] for answer in at_once if answer[1] == LookupStatus.FOUND} == set(held) & set(asked), \
        f"seed {seed}"


def test_the_inline_reads_serve_a_record_in_memory_only(record, tmp_path, memory_path):
    path, _ = record
    assert InlineReads.in_memory(path) == path.startswith(str(memory_path))
    assert InlineReads.in_memory(str(memory_path / "payments.db"))
    assert not InlineReads.in_memory(str(tmp_path / "payments.db"))
    with pytest.raises(FileNotFoundError):
        InlineReads.in_memory(str(tmp_path / "gone" / "payments.db"))


def test_the_inline_reads_never_wait_for_a_lock(tmp_path, memory_path):
    """While another connection holds the record's lock, a lookup fails at
    once (SQLITE_BUSY), and so does a summary, instead of blocking the
    thread that asked; the next ones after the lock is released answer. (A record in WAL mode rarely
    sees such a lock, during another connection's recovery for one: shown
    here in rollback mode, where an exclusive transaction takes it.)"""
    for directory in (tmp_path, memory_path):
        path = str(directory / "locked.db")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute(PAYMENTS_TABLE)
        correlation_id = os.urandom(16)
        holder.execute("INSERT INTO payments VALUES (7, ?, 1, 1990, 0)", (correlation_id,))
        inline = InlineReads(path, [PAYMENTS_BY_PROCESSOR])
        holder.execute("BEGIN EXCLUSIVE")
        [(_, status, _, _, _, error)] = inline.lookup([correlation_id])
        assert (status, error) == (LookupStatus.FAILED, sqlite3.SQLITE_BUSY)
        assert inline.summary(0, []) == (sqlite3.SQLITE_BUSY, None, None)
        holder.execute("COMMIT")
        holder.close()
        assert inline.lookup([correlation_id])[0][1:5] == (LookupStatus.FOUND, 1990, 1, 7)
        assert inline.summary(0, []) == (0, (0, 0, 1, 1990), {})
        inline.close()
        with pytest.raises(RuntimeError, match="closed"):
            inline.lookup([correlation_id])
        with pytest.raises(RuntimeError, match="closed"):
            inline.summary(0, [])
        with pytest.raises(ValueError):
            InlineReads(path, []).lookup([b"short"])


def collect_summaries(reader: RecordReader, count: int) -> list:
    summaries = []
    while len(summaries) < count:
        ready, _, _ = select.select([reader.event_fd], [], [], 10)
        assert ready, f"{count - len(summaries)} summaries never came"
        lookups, answered = reader.answers()
        assert not lookups
        summaries.extend(answered)
    return summaries


def test_summaries_answer_in_order_exactly_beside_lookups(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = str(tmp_path / "payments.db")
    writer = record_sql.connect_writer(path)
    settlements = [Settlement(rng.randbytes(16), rng.choice((1, rng.randrange(10**16))), rng.randrange(2),
                              rng.randrange(10_000), 0, index + 1) for index in range(3000)]
    record_sql.commit_settlements(writer, "api1", settlements[:2000], 2000)
    record_sql.commit_settlements(writer, "api2", settlements[2000:], 3000)
    reader = RecordReader(path, record_sql.SUMMARY_STATEMENTS)
    inline = InlineReads(path, record_sql.SUMMARY_STATEMENTS)
    thread = served(reader)
    ranges = [sorted((rng.randrange(-100, 10_100), rng.randrange(-100, 10_100))) for _ in range(200)]
    ranges += [(None, None), (5, 4), (None, 17), (9_990, None)]
    at_once = [inline.summary(*record_sql.summary_query(0, from_ms, to_ms)) for from_ms, to_ms in ranges]
    inline.close()
    lookups = []
    for from_ms, to_ms in ranges:
        reader.ask_summary(*record_sql.summary_query(0, from_ms, to_ms))
        correlation_id = rng.choice(settlements).correlation_id
        reader.ask([correlation_id])
        lookups.append(correlation_id)
    answered_lookups, answered_summaries = [], []
    while len(answered_summaries) < len(ranges) or len(answered_lookups) < len(lookups):
        ready, _, _ = select.select([reader.event_fd], [], [], 10)
        assert ready, f"answers never came, seed {seed}"
        some_lookups, some_summaries = reader.answers()
        answered_lookups += some_lookups
        answered_summaries += some_summaries
    reader.stop()
    thread.join()
    reader.close()
    writer.close()
    assert [answer[0] for answer in answered_lookups] == lookups, f"seed {seed}"
    assert at_once == answered_summaries, f"seed {seed}"
    for (from_ms, to_ms), (error, totals, committed) in zip(ranges, answered_summaries, strict=True):
        expected = [0, 0, 0, 0]
        for settlement in settlements:
            if (from_ms is None or settlement.requested_at_ms >= from_ms) and (
                    to_ms is None or settlement.requested_at_ms <= to_ms):
                expected[2 * settlement.processor] += 1
                expected[2 * settlement.processor + 1] += settlement.cents
        assert (error, totals, committed) == (0, tuple(expected), {"api1": 2000, "api2": 3000}), (
            f"range {from_ms}..{to_ms}, seed {seed}")


def test_a_summary_that_fails_says_so_and_the_next_one_answers(record):
    path, connection = record
    connection.execute("CREATE TABLE committed (instance TEXT, journal_seq INTEGER)")
    connection.execute("INSERT INTO committed VALUES ('api1', 7)")
    connection.commit()
    reader = RecordReader(path, [
        "SELECT NULL, ?1, 1, 2, 3",  # a processor the record cannot hold
        "SELECT NULL, 1, 4, 5, 6 UNION ALL SELECT instance, NULL, journal_seq, NULL, NULL FROM committed",
    ])
    reader.ask_summary(0, [5])
    reader.ask_summary(1, [])
    reader.ask_summary(0, [0])
    reader.stop()
    reader.serve()
    failed, answered, same_statement = collect_summaries(reader, 3)
    reader.close()
    inline = InlineReads(path, [
        "SELECT NULL, ?1, 1, 2, 3",
        "SELECT NULL, 1, 4, 5, 6 UNION ALL SELECT instance, NULL, journal_seq, NULL, NULL FROM committed",
    ])
    assert [inline.summary(0, [5]), inline.summary(1, []), inline.summary(0, [0])] == [
        failed, answered, same_statement]
    inline.close()
    assert failed[0] != 0 and failed[1:] == (None, None)
    assert answered == (0, (0, 0, 4, (6 << 32) + 5), {"api1": 7})
    assert same_statement == (0, (1, (3 << 32) + 2, 0, 0), {})


def test_a_summary_names_a_statement_and_all_its_parameters(record):
    path, _ = record
    reader = RecordReader(path, ["SELECT NULL, 0, ?1, ?2, 0"])
    inline = InlineReads(path, ["SELECT NULL, 0, ?1, ?2, 0"])
    for statement, parameters in ((1, [1, 2]), (-1, [1, 2]), (0, [1]), (0, [1, 2, 3])):
        with pytest.raises(ValueError):
            reader.ask_summary(statement, parameters)
        with pytest.raises(ValueError):
            inline.summary(statement, parameters)
    inline.close()
    with pytest.raises(OSError, match="payments"):
        RecordReader(path, ["SELECT nothing FROM nowhere"])
    reader.close()
