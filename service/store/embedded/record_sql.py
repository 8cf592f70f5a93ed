"""The payments record's database (Python's sqlite3, WAL mode): its schema and
what the record does on one connection. record.py decides on which thread and
when; nothing here keeps state beyond the connection.

Tables:
- payments: one row per settled correlationId, keyed by (requested_at_ms,
  correlation_id) so recent rows sit together (summary edges, retention), with
  a unique index on correlation_id: a second settlement of an id is nothing.
- buckets: per (level, start, generation, processor), the count and cents of
  the payments in that bucket of that width (record_ranges.LEVEL_WIDTHS_MS).
  Cents are split into their low 32 bits (always < 2**32, carried upward) and
  the rest, so no SUM over them overflows SQLite's int64, whatever the history.
- committed: per instance, the last journal sequence whose settlements are in.
- meta: schema_version, generation (the purge generation), retained_from
  (what retention deleted lies below it; summaries never look below it).

Only inserts that happen count: an AFTER INSERT trigger (a TEMP one, on the
writing connection) copies each new row into an in-memory table, which is
added to the buckets once per commit, grouped; a duplicate correlationId is
skipped by ON CONFLICT DO NOTHING, so it fires nothing and counts nothing.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import NamedTuple

from paycore.core.recent_ledger import LEVEL_WIDTHS_MS as RECENT_WIDTHS_MS

from ...payment import Attempt, Payment
from .record_ranges import LEVEL_WIDTHS_MS, MAX_BUCKET_RUNS, MAX_EDGES, plan_range

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another instance's transaction
WRITER_CACHE_KIB = 8192  # the id index's hot pages; the OS page cache holds the rest
LOW_MASK = (1 << 32) - 1
UNBOUNDED_MS = 1 << 62  # a missing summary bound, and the farthest one: past any requestedAt
# Statements bind this many rows (or ids) at once; a batch uses the largest as
# often as it fits, then the smallest one that holds the rest, padded with a
# repeat of its last item (a repeated row or id changes nothing). A few fixed
# sizes keep every statement prepared once.
ROWS_PER_STATEMENT = (1, 4, 16, 64, 256)


class Settlement(NamedTuple):
    """A payment a processor holds, handed to the record once its journal
    record is durable."""
    correlation_id: bytes  # the UUID's 16 bytes
    cents: int
    processor: int         # 0 default, 1 fallback
    requested_at_ms: int
    generation: int        # the purge generation it was settled in
    journal_seq: int       # its SETTLED record's sequence in the instance's journal


SCHEMA = f"""
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', {SCHEMA_VERSION}), ('generation', 0),
                        ('retained_from', {-UNBOUNDED_MS});
CREATE TABLE committed (
    instance TEXT PRIMARY KEY,
    journal_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE payments (
    requested_at_ms INTEGER NOT NULL,
    correlation_id BLOB NOT NULL,
    processor INTEGER NOT NULL,
    cents INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (requested_at_ms, correlation_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX payments_by_id ON payments (correlation_id);
CREATE TABLE buckets (
    level INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    processor INTEGER NOT NULL,
    count INTEGER NOT NULL,
    cents_low INTEGER NOT NULL,
    cents_high INTEGER NOT NULL,
    PRIMARY KEY (level, start_ms, generation, processor)
) WITHOUT ROWID;
CREATE VIEW settled_payments AS
SELECT lower(substr(hex(correlation_id), 1, 8) || '-' || substr(hex(correlation_id), 9, 4) || '-'
             || substr(hex(correlation_id), 13, 4) || '-' || substr(hex(correlation_id), 17, 4) || '-'
             || substr(hex(correlation_id), 21, 12)) AS correlation_id,
       printf('%d.%02d', cents / 100, cents % 100) AS amount,
       CASE processor WHEN 0 THEN 'default' WHEN 1 THEN 'fallback' END AS processor,
       strftime('%Y-%m-%dT%H:%M:%fZ', requested_at_ms / 1000.0, 'unixepoch') AS requested_at,
       generation,
       requested_at_ms
FROM payments;
"""

WRITER_SETUP = """
CREATE TEMP TABLE fresh (requested_at_ms INTEGER, processor INTEGER, cents INTEGER, generation INTEGER);
CREATE TEMP TRIGGER fresh_payment AFTER INSERT ON main.payments BEGIN
    INSERT INTO fresh VALUES (NEW.requested_at_ms, NEW.processor, NEW.cents, NEW.generation);
END;
"""

_LEVELS = ", ".join(f"({level}, {width})" for level, width in enumerate(LEVEL_WIDTHS_MS))
ADD_FRESH_TO_BUCKETS = f"""
WITH levels(level, width) AS (VALUES {_LEVELS}),
grouped AS (
    SELECT level, requested_at_ms - ((requested_at_ms % width) + width) % width AS start_ms,
           generation, processor, count(*) AS n,
           sum(cents & {LOW_MASK}) AS low, sum(cents >> 32) AS high
    FROM fresh, levels GROUP BY 1, 2, 3, 4)
INSERT INTO buckets (level, start_ms, generation, processor, count, cents_low, cents_high)
SELECT level, start_ms, generation, processor, n, low & {LOW_MASK}, high + (low >> 32) FROM grouped WHERE true
ON CONFLICT DO UPDATE SET
    count = count + excluded.count,
    cents_low = (cents_low + excluded.cents_low) & {LOW_MASK},
    cents_high = cents_high + excluded.cents_high + ((cents_low + excluded.cents_low) >> 32)
"""

INSERT_PAYMENTS = {
    rows: "INSERT INTO payments (correlation_id, cents, processor, requested_at_ms, generation) VALUES "
          + ", ".join(["(?, ?, ?, ?, ?)"] * rows) + " ON CONFLICT DO NOTHING"
    for rows in ROWS_PER_STATEMENT
}
SETTLED_AMONG = {
    ids: "SELECT correlation_id, cents, processor, requested_at_ms FROM payments WHERE correlation_id IN ("
         + ", ".join(["?"] * ids) + ")"
    for ids in ROWS_PER_STATEMENT
}
ADVANCE_COMMITTED = """
INSERT INTO committed VALUES (?1, ?2)
ON CONFLICT DO UPDATE SET journal_seq = max(journal_seq, excluded.journal_seq)
"""

# Nothing below retained_from counts: retention deletes rows and buckets there
# in slices, a whole day at a time, so every bucket lies wholly on one side.
_FLOOR = "(SELECT value FROM meta WHERE key = 'retained_from')"


def _summary_statement(runs: int, edges: int) -> str:
    """?1: the generation; then (level, first start, last start) per bucket
    run and (from, to) per edge; then every instance's committed sequence."""
    parts = [f"SELECT processor, count AS n, cents_low AS low, cents_high AS high FROM buckets"
             f" WHERE level = ?{2 + 3 * run} AND start_ms BETWEEN max(?{3 + 3 * run}, {_FLOOR})"
             f" AND ?{4 + 3 * run} AND generation = ?1" for run in range(runs)]
    first = 2 + 3 * runs
    parts += [f"SELECT processor, 1 AS n, cents & {LOW_MASK} AS low, cents >> 32 AS high FROM payments"
              f" WHERE requested_at_ms BETWEEN max(?{first + 2 * edge}, {_FLOOR})"
              f" AND ?{first + 1 + 2 * edge} AND generation = ?1" for edge in range(edges)]
    totals = ("SELECT NULL, processor, sum(n), sum(low), sum(high) FROM ("
              + " UNION ALL ".join(parts) + ") GROUP BY processor UNION ALL ") if parts else ""
    return totals + "SELECT instance, NULL, journal_seq, NULL, NULL FROM committed"


# One per shape of range plan, each prepared once: number runs * (MAX_EDGES + 1) + edges.
SUMMARY_STATEMENTS = [_summary_statement(runs, edges)
                      for runs in range(MAX_BUCKET_RUNS + 1) for edges in range(MAX_EDGES + 1)]

# What paycore.core.recent_ledger rebuilds its rings from, in one read
# transaction: the generation; every instance's committed sequence; then per
# ring, ?1 the generation and ?2 the first bucket start it has room for, rows
# of (start_ms, processor, count, cents_low, cents_high). Its 1 ms ring sums
# payments rows, the others are the record's buckets of the same widths
# (levels 0 up, LEVEL_WIDTHS_MS).
RECENT_REBUILD_STATEMENTS = [
    "SELECT value FROM meta WHERE key = 'generation'",
    "SELECT instance, journal_seq FROM committed",
    f"SELECT requested_at_ms, processor, count(*), sum(cents & {LOW_MASK}), sum(cents >> 32) FROM payments"
    " WHERE requested_at_ms >= ?2 AND generation = ?1 GROUP BY requested_at_ms, processor",
    *(f"SELECT start_ms, processor, count, cents_low, cents_high FROM buckets"
      f" WHERE level = {level} AND start_ms >= ?2 AND generation = ?1"
      for level in range(len(RECENT_WIDTHS_MS) - 1)),
]

RETAIN_FROM = "UPDATE meta SET value = max(value, ?1) WHERE key = 'retained_from'"
DELETE_OLD_PAYMENTS = """
DELETE FROM payments WHERE (requested_at_ms, correlation_id) IN
    (SELECT requested_at_ms, correlation_id FROM payments WHERE requested_at_ms < ?1 LIMIT ?2)
"""
DELETE_OLD_BUCKETS = """
DELETE FROM buckets WHERE (level, start_ms, generation, processor) IN
    (SELECT level, start_ms, generation, processor FROM buckets WHERE level = ?1 AND start_ms < ?2 LIMIT ?3)
"""


class RecordError(Exception):
    """The database cannot be used as a payments record."""


def connect_writer(path: str) -> sqlite3.Connection:
    """The connection that writes: WAL mode (readers go on while one writer
    commits; two instances' writers take turns within BUSY_TIMEOUT_S), and
    the schema created or checked. synchronous=NORMAL: SQLite syncs the WAL
    before each checkpoint and the database after it, and the writer (with
    sync) makes a group of commits durable with one fdatasync of the WAL
    before it tells the journal, which deletes what they hold: the record
    survives whatever the journal would, at a few syncs a second instead of
    one per commit (which slowed the journal's own syncs on a shared disk)."""
    connection = _connect(path)
    try:
        mode = _set_wal_mode(connection)
        if mode != "wal":
            raise RecordError(f"payments record {path}: WAL mode unavailable (journal_mode is {mode})")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA temp_store = MEMORY")
        connection.execute(f"PRAGMA cache_size = {-WRITER_CACHE_KIB}")
        _ensure_schema(connection, path)
        connection.executescript(WRITER_SETUP)
    except BaseException:
        connection.close()
        raise
    return connection


def _set_wal_mode(connection: sqlite3.Connection) -> str:
    """PRAGMA journal_mode = WAL, the journal mode it reports. On a new file
    the switch needs the file to itself, and SQLite answers "locked" at once
    instead of waiting while another instance opens it too: asked again
    until BUSY_TIMEOUT_S has passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def connect_reader(path: str) -> sqlite3.Connection:
    """A connection that only reads, once connect_writer made the file."""
    connection = _connect(path)
    connection.execute("PRAGMA query_only = 1")
    return connection


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are exactly the ones begun here.
    # check_same_thread=False: one thread at a time uses a connection, but
    # not always the one that opened it (record.py hands it to its thread).
    return sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)


@contextmanager
def _write_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE: take the write lock first (waiting for another
    instance's writer), so a transaction never fails halfway for want of it."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _ensure_schema(connection: sqlite3.Connection, path: str) -> None:
    """Create the schema in a new file, or check the version of an existing
    one; the write lock makes two instances starting together agree."""
    with _write_transaction(connection):
        if connection.execute("SELECT 1 FROM sqlite_schema WHERE name = 'meta'").fetchone() is None:
            for statement in SCHEMA.split(";\n"):
                connection.execute(statement)
            return
        version = _meta(connection, "schema_version")
        if version > SCHEMA_VERSION:
            raise RecordError(
                f"payments record {path} has schema version {version}, newer than this"
                f" version of paycore understands ({SCHEMA_VERSION}): run a newer paycore")


def _meta(connection: sqlite3.Connection, key: str) -> int:
    return connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def generation(connection: sqlite3.Connection) -> int:
    return _meta(connection, "generation")


def committed_seq(connection: sqlite3.Connection, instance: str) -> int:
    """The last journal sequence of `instance` the record holds; 0: none."""
    row = connection.execute("SELECT journal_seq FROM committed WHERE instance = ?", (instance,)).fetchone()
    return 0 if row is None else row[0]


def commit_settlements(connection: sqlite3.Connection, instance: str,
                       settlements: Sequence[Settlement], through_seq: int) -> Sequence[Settlement]:
    """One transaction: the settlements whose correlationId is new, their
    buckets, and `instance`'s committed sequence raised to through_seq.
    The settlements it inserted: all of them, unless some id was held
    already (then the inserted rows, with correlation_id and journal_seq None)."""
    with _write_transaction(connection):
        for rows in _statement_batches(settlements):
            connection.execute(INSERT_PAYMENTS[len(rows)],
                               list(chain.from_iterable(settlement[:5] for settlement in rows)))
        (inserted,), = connection.execute("SELECT count(*) FROM fresh")
        if inserted != len(settlements):
            settlements = [Settlement(None, *row, None) for row in connection.execute(  # type: ignore[arg-type]
                "SELECT cents, processor, requested_at_ms, generation FROM fresh")]
        connection.execute(ADD_FRESH_TO_BUCKETS)
        connection.execute("DELETE FROM fresh")
        connection.execute(ADVANCE_COMMITTED, (instance, through_seq))
    return settlements


def next_generation(connection: sqlite3.Connection) -> int:
    """A new purge generation, committed."""
    with _write_transaction(connection):
        (value,), = connection.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'generation' RETURNING value").fetchall()
    return value


def delete_before(connection: sqlite3.Connection, cutoff_ms: int, rows: int) -> tuple[int, bool]:
    """One transaction: raise the retention floor to cutoff_ms and delete at
    most `rows` payments and `rows` buckets of each level below it. The rows
    deleted, and whether nothing is left below the floor."""
    with _write_transaction(connection):
        connection.execute(RETAIN_FROM, (cutoff_ms,))
        deleted = [connection.execute(DELETE_OLD_PAYMENTS, (cutoff_ms, rows)).rowcount]
        for level in range(len(LEVEL_WIDTHS_MS)):
            deleted.append(connection.execute(DELETE_OLD_BUCKETS, (level, cutoff_ms, rows)).rowcount)
    return sum(deleted), max(deleted) < rows


def settled_among(connection: sqlite3.Connection, correlation_ids: Sequence[bytes]) -> dict[bytes, Attempt]:
    """Which of the ids the record holds, as the processor holds them."""
    found = {}
    for ids in _statement_batches(correlation_ids):
        for correlation_id, cents, processor, requested_at_ms in connection.execute(SETTLED_AMONG[len(ids)], ids):
            found[correlation_id] = Attempt(Payment(correlation_id, cents), processor, requested_at_ms)
    return found


def settled_since(connection: sqlite3.Connection, from_ms: int) -> Iterator[Payment]:
    """Every payment the record holds with requestedAt at or after from_ms, oldest first."""
    for correlation_id, cents in connection.execute(
            "SELECT correlation_id, cents FROM payments WHERE requested_at_ms >= ? ORDER BY requested_at_ms",
            (from_ms,)):
        yield Payment(correlation_id, cents)


class SummaryQuery(NamedTuple):
    statement: int          # an index into SUMMARY_STATEMENTS
    parameters: list[int]


def summary_query(generation: int, from_ms: int | None, to_ms: int | None) -> SummaryQuery:
    """The statement and parameters that read the totals of `generation` for
    requestedAt in [from_ms, to_ms] (inclusive, None unbounded) and every
    instance's committed sequence, in one statement, so from one snapshot
    (paycore.core.record_reader runs it)."""
    plan = plan_range(-UNBOUNDED_MS if from_ms is None else max(from_ms, -UNBOUNDED_MS),
                      UNBOUNDED_MS if to_ms is None else min(to_ms, UNBOUNDED_MS))
    parameters = [generation] if plan.buckets or plan.edges else []  # an empty range reads only the sequences
    parameters.extend(chain.from_iterable(plan.buckets))
    parameters.extend(chain.from_iterable(plan.edges))
    return SummaryQuery(len(plan.buckets) * (MAX_EDGES + 1) + len(plan.edges), parameters)


def edges_query(generation: int, edges: Sequence[tuple[int | None, int | None]]) -> SummaryQuery:
    """summary_query for at most MAX_EDGES ranges of a few milliseconds,
    summed from payments rows (inclusive, None unbounded)."""
    parameters = [generation] if edges else []
    for from_ms, to_ms in edges:
        parameters += [-UNBOUNDED_MS if from_ms is None else from_ms, UNBOUNDED_MS if to_ms is None else to_ms]
    return SummaryQuery(len(edges), parameters)


def _statement_batches(items: Sequence) -> Iterable[Sequence]:
    """items in slices of ROWS_PER_STATEMENT sizes, the last one padded."""
    largest = ROWS_PER_STATEMENT[-1]
    start = 0
    while len(items) - start >= largest:
        yield items[start:start + largest]
        start += largest
    rest = len(items) - start
    if rest:
        size = next(size for size in ROWS_PER_STATEMENT if size >= rest)
        yield list(items[start:]) + [items[-1]] * (size - rest)
