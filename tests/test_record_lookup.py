"""The record's lookup thread (paycore.core.record_lookup): answers in the
order asked, found or absent as the record holds them, whatever the batch."""
import os
import random
import select
import sqlite3
import threading

import pytest

from paycore.core.record_lookup import LookupStatus, RecordLookup


@pytest.fixture
def record(tmp_path):
    path = str(tmp_path / "payments.db")
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("CREATE TABLE payments (requested_at_ms INTEGER, correlation_id BLOB UNIQUE, "
                       "processor INTEGER, cents INTEGER, generation INTEGER)")
    yield path, connection
    connection.close()


def collect(lookup: RecordLookup, count: int) -> list:
    answers = []
    while len(answers) < count:
        ready, _, _ = select.select([lookup.event_fd], [], [], 10)
        assert ready, f"{count - len(answers)} answers never came"
        answers.extend(lookup.answers())
    return answers


def served(lookup: RecordLookup) -> threading.Thread:
    thread = threading.Thread(target=lookup.serve, daemon=True)
    thread.start()
    return thread


def test_answers_come_in_the_order_asked_found_or_absent(record):
    path, connection = record
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    held = {rng.randbytes(16): (rng.randrange(1, 10**9), rng.randrange(2), rng.randrange(2**41))
            for _ in range(500)}
    connection.executemany("INSERT INTO payments VALUES (?, ?, ?, ?, 0)",
                           [(at, cid, processor, cents) for cid, (cents, processor, at) in held.items()])
    connection.commit()
    asked = [rng.choice(list(held)) if rng.random() < 0.5 else rng.randbytes(16) for _ in range(2000)]
    lookup = RecordLookup(path)
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
    lookup = RecordLookup(path)
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
    lookup = RecordLookup(path)
    ids = [os.urandom(16) for _ in range(100)]
    lookup.ask(ids)
    lookup.stop()
    lookup.serve()  # after stop(), as a thread may start late: answers, then returns
    assert [answer[0] for answer in lookup.answers()] == ids
    lookup.close()
    with pytest.raises(RuntimeError):
        lookup.serve()


def test_an_id_is_sixteen_bytes_and_a_record_without_payments_is_refused(record, tmp_path):
    path, _ = record
    lookup = RecordLookup(path)
    with pytest.raises(ValueError):
        lookup.ask([b"short"])
    lookup.close()
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(OSError, match="payments"):
        RecordLookup(str(tmp_path / "empty.db"))
