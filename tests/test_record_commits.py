"""The record's commits (paycore.core.record_writer, through
record_sql.commit_settlements): what a commit inserts, counts and advances,
what it leaves out, and that a commit that fails leaves nothing of itself."""
import random
import sqlite3

import pytest

from paycore.core.record_writer import RecordWriter
from paycore.service.store.embedded import record_sql
from paycore.service.store.embedded.record import Settlement


@pytest.fixture
def record_path(tmp_path):
    path = str(tmp_path / "payments.db")
    record_sql.connect_writer(path).close()
    return path


def settlements(rng, count, seq_from=1):
    return [Settlement(rng.randbytes(16), rng.randrange(1, 10**12), rng.randrange(2),
                       1_752_600_000_000 + rng.randrange(86_400_000), 0, seq_from + index)
            for index in range(count)]


def held(path):
    with sqlite3.connect(path) as connection:
        payments = sorted(connection.execute(
            "SELECT correlation_id, cents, processor, requested_at_ms, generation FROM payments"))
        buckets = connection.execute(
            "SELECT level, sum(count), sum(cents_low) + (sum(cents_high) << 32) FROM buckets GROUP BY level"
        ).fetchall()
        committed = dict(connection.execute("SELECT instance, journal_seq FROM committed"))
    return payments, buckets, committed


def expected_buckets(rows):
    levels = len(record_sql.LEVEL_WIDTHS_MS)
    return [(level, len(rows), sum(row[1] for row in rows)) for level in range(levels)] if rows else []


def test_a_commit_inserts_counts_and_advances_the_instance(record_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    batch = settlements(rng, 1000)
    committer = record_sql.open_committer(record_path)
    assert record_sql.commit_settlements(committer, "api1", batch, 1000) is batch, f"seed {seed}"
    assert record_sql.commit_settlements(committer, "api2", [], 7) == []
    committer.close()
    payments, buckets, committed = held(record_path)
    assert payments == sorted(tuple(settlement[:5]) for settlement in batch), f"seed {seed}"
    assert buckets == expected_buckets(batch), f"seed {seed}"
    assert committed == {"api1": 1000, "api2": 7}


def test_ids_held_already_are_neither_inserted_nor_counted(record_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    first = settlements(rng, 200)
    committer = record_sql.open_committer(record_path)
    record_sql.commit_settlements(committer, "api1", first, 50)
    # Half of them again (another amount: the record keeps the first), a new
    # one twice in the same batch, and fresh ones: more than one INSERT's rows.
    again = [settlement._replace(cents=settlement.cents + 1) for settlement in first[::2]]
    new = settlements(rng, 100, seq_from=201)
    batch = again + new + [new[0]]
    assert len(batch) > 2 * record_sql.INSERT_ROWS
    inserted = record_sql.commit_settlements(committer, "api1", batch, 40)
    committer.close()
    assert inserted == [Settlement(None, *settlement[1:5], None) for settlement in new], f"seed {seed}"
    payments, buckets, committed = held(record_path)
    assert payments == sorted(tuple(settlement[:5]) for settlement in first + new), f"seed {seed}"
    assert buckets == expected_buckets(first + new), f"seed {seed}"
    assert committed == {"api1": 50}, "a committed sequence never goes back"


def test_a_commit_that_cannot_take_the_lock_fails_whole_and_the_next_one_commits(record_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    committer = RecordWriter(record_path, record_sql.COMMITTER_SETUP, record_sql.COMMIT_STATEMENTS, 0)
    other = sqlite3.connect(record_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    batch = settlements(rng, 10)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        committer.commit("api1", batch, 10)
    other.execute("ROLLBACK")
    other.close()
    assert held(record_path) == ([], [], {})
    assert committer.commit("api1", batch, 10) is None, f"seed {seed}"
    committer.close()
    assert held(record_path)[0] == sorted(tuple(settlement[:5]) for settlement in batch), f"seed {seed}"


def test_a_commit_that_fails_halfway_leaves_nothing_of_itself(record_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    record_sql.commit_settlements(record_sql.open_committer(record_path), "api1", settlements(rng, 5), 5)
    before = held(record_path)
    with sqlite3.connect(record_path) as connection:
        (pages,), = connection.execute("PRAGMA page_count")
    # A file that may not grow: the inserts fail once the pages they have are full.
    full = RecordWriter(record_path, record_sql.COMMITTER_SETUP + f"PRAGMA max_page_count = {pages};",
                        record_sql.COMMIT_STATEMENTS, 1000)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        full.commit("api1", settlements(rng, 5000, seq_from=6), 5005)
    assert held(record_path) == before, f"seed {seed}"
    # The same connection commits on: the failed transaction was ended, and
    # what it had collected for the buckets went with it.
    assert full.commit("api1", [], 5005) is None
    full.close()
    assert held(record_path) == (before[0], before[1], {"api1": 5005}), f"seed {seed}"
    committer = record_sql.open_committer(record_path)
    batch = settlements(rng, 20, seq_from=5006)
    assert committer.commit("api1", batch, 5025) is None, f"seed {seed}"
    committer.close()
    assert held(record_path)[1] == expected_buckets(before[0] + [tuple(row[:5]) for row in batch])


def test_a_missing_record_or_one_without_the_schema_is_refused(tmp_path):
    path = str(tmp_path / "payments.db")
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        record_sql.open_committer(path)  # connect_writer makes the file, never the committer
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE other (x)")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        record_sql.open_committer(path)


def test_a_correlation_id_is_sixteen_bytes(record_path):
    committer = record_sql.open_committer(record_path)
    with pytest.raises(ValueError, match="16 bytes"):
        committer.commit("api1", [Settlement(b"short", 1, 0, 1, 0, 1)], 1)
    committer.close()
    with pytest.raises(ValueError, match="closed"):
        committer.commit("api1", [], 1)
