"""The payments record's recent past in shared memory, summed by every
instance of a host without a query (see the .pxd)."""
import os

from libc.errno cimport EINTR, errno
from libc.stdint cimport INT64_MAX, UINT32_MAX, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport F_UNLCK, F_WRLCK, O_CREAT, O_RDWR
from posix.mman cimport MAP_FAILED, MAP_POPULATE, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, ftruncate

from paycore.core.instance_registry cimport (INSTANCE_NAME_MAX, check_instance_name, register_instance,
                                             register_name, slot_name)
from paycore.core.posix_files cimport lock_file, open_or_raise, raise_os_error
from paycore.core.processor_sums cimport add_payments, sums_tuple
from paycore.core.sqlite3_api cimport (
    SQLITE_DONE, SQLITE_FULL, SQLITE_OK, SQLITE_OPEN_NOMUTEX, SQLITE_OPEN_READONLY, SQLITE_ROW,
    sqlite3_bind_int64, sqlite3_busy_timeout, sqlite3_close_v2, sqlite3_column_bytes, sqlite3_column_int64,
    sqlite3_column_text, sqlite3_exec, sqlite3_finalize, sqlite3_open_v2, sqlite3_prepare_v2, sqlite3_step,
)


cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t recent_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t recent_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void recent_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    /* Seqlock writer: the odd sequence is seen before any change that follows it. */
    static inline void recent_begin(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    static inline void recent_fence(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    """
    uint64_t load_acquire "recent_load"(const uint64_t* pointer) nogil
    uint64_t load_relaxed "recent_load_relaxed"(const uint64_t* pointer) nogil
    void store_release "recent_store"(uint64_t* pointer, uint64_t value) nogil
    void store_then_fence "recent_begin"(uint64_t* pointer, uint64_t value) nogil
    void fence_acquire "recent_fence"() nogil


cdef enum:
    FILE_MODE = 0o666          # every instance maps it, whatever user it runs as
    RECENT_VERSION = 1
    HEADER_ROOM = 8192         # the header, rounded up to whole pages
    READ_ATTEMPTS = 4          # a writer changes the file for microseconds; after that many, read the record
    BUSY_TIMEOUT_MS = 30000    # as long as the record's own connections wait

cdef uint64_t RECENT_MAGIC = 0x544e434552594150ULL   # "PAYRECNT"
cdef uint64_t LOW_BITS = 0xFFFFFFFFULL

FILE_NAME = "recent-ledger.shm"
# 1 ms, then the record's own widths up to a minute (record_ranges.LEVEL_WIDTHS_MS).
LEVEL_WIDTHS_MS = (1, 10, 100, 1_000, 60_000)
# 1 ms: 131 s back; the others: 61 minutes, so any range that starts within
# the last hour is held whole but for its milliseconds before the 1 ms ring.
LEVEL_SLOTS = (131_072, 366_000, 36_600, 3_660, 61)

cdef int64_t WIDTHS[RECENT_LEVELS]
cdef int64_t SLOTS[RECENT_LEVELS]
cdef int _level
for _level in range(RECENT_LEVELS):
    WIDTHS[_level] = LEVEL_WIDTHS_MS[_level]
    SLOTS[_level] = LEVEL_SLOTS[_level]
# Bounds no range computation overflows within.
cdef int64_t FARTHEST_MS = 1LL << 62


cdef inline int64_t floor_div(int64_t value, int64_t width) noexcept nogil:
    cdef int64_t quotient = value / width
    if value % width < 0:
        quotient -= 1
    return quotient


cdef inline int64_t align_up(int64_t value, int64_t width) noexcept nogil:
    return -floor_div(-value, width) * width


cdef inline Bucket* bucket_at(Bucket* ring, int level, int64_t bucket) noexcept nogil:
    cdef int64_t index = bucket % SLOTS[level]
    return &ring[index + SLOTS[level] if index < 0 else index]


cdef inline bint held(const RecentHeader* header, int level, int64_t bucket) noexcept nogil:
    """The ring of `level` has room for this bucket (it is the newest or one
    of the slots - 1 before it, or later: then it is empty)."""
    return bucket > floor_div(header.newest_ms, WIDTHS[level]) - SLOTS[level]


cdef size_t file_size() noexcept nogil:
    cdef size_t size = HEADER_ROOM
    cdef int level
    for level in range(RECENT_LEVELS):
        size += SLOTS[level] * sizeof(Bucket)
    return size


cdef void add_to_bucket(Bucket* bucket, int processor, uint64_t count, uint64_t cents) noexcept nogil:
    if bucket.count[processor] == UINT32_MAX:
        return
    if count >= UINT32_MAX - bucket.count[processor] or cents > <uint64_t>-1 - bucket.cents[processor]:
        bucket.count[processor] = UINT32_MAX
        return
    bucket.count[processor] += count
    bucket.cents[processor] += cents


cdef class RecentLedger:
    """The record's recent buckets in `directory` (a tmpfs shared by the
    host's instances), kept by this instance's record writer after each of
    its commits and read by its event loop. record_path and rebuild_statements
    (record_sql.RECENT_REBUILD_STATEMENTS) read the record when the file must
    be built again from it."""

    def __cinit__(self):
        self.fd = -1
        self.own_slot = -1

    def __init__(self, str directory, str instance, str record_path, list rebuild_statements not None):
        check_instance_name(instance)
        if len(rebuild_statements) != REBUILD_STATEMENTS:
            raise ValueError(f"{REBUILD_STATEMENTS} rebuild statements expected, got {len(rebuild_statements)}")
        self.instance = instance
        self.record_path = os.fsencode(record_path)
        self.record_text = self.record_path
        self.rebuild_sql = [statement.encode() for statement in rebuild_statements]
        cdef int index
        for index in range(REBUILD_STATEMENTS):
            self.rebuild_text[index] = <bytes>self.rebuild_sql[index]
        self.path = os.path.join(directory, FILE_NAME)
        self.fd = open_or_raise(self.path, O_RDWR | O_CREAT, FILE_MODE)
        if lock_file(self.fd, F_WRLCK, True) != 0:
            raise_os_error(self.path)
        try:
            self._map()
            self.own_slot = register_instance(self.header.names, instance)
            if self.own_slot < 0:
                raise RuntimeError(f"the recent ledger registry in {directory} is full ({REGISTRY_SLOTS} instances)")
        finally:
            lock_file(self.fd, F_UNLCK, False)

    def __dealloc__(self):
        self._release()

    def _map(self):
        cdef struct_stat status
        cdef size_t size = file_size()
        if fstat(self.fd, &status) != 0:
            raise_os_error(self.path)
        cdef bint fits = <size_t>status.st_size == size
        # A file of another layout starts over (zeros): it is only ever built again from the record.
        if not fits and (ftruncate(self.fd, 0) != 0 or ftruncate(self.fd, size) != 0):
            raise_os_error(self.path)
        # Every page mapped now, not at a first touch while serving.
        cdef void* base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, self.fd, 0)
        if base == MAP_FAILED:
            raise_os_error(self.path)
        self.base = <char*>base
        self.mapped_size = size
        self.header = <RecentHeader*>base
        cdef int level
        cdef char* ring = self.base + HEADER_ROOM
        for level in range(RECENT_LEVELS):
            self.rings[level] = <Bucket*>ring
            ring += SLOTS[level] * sizeof(Bucket)
        if not (fits and self._layout_matches()):
            if fits:
                memset(self.base, 0, size)  # a file cut short while it was made: truncated ones are zeros
            self.header.version = RECENT_VERSION
            self.header.bucket_size = sizeof(Bucket)
            memcpy(self.header.widths, WIDTHS, sizeof(WIDTHS))
            memcpy(self.header.slots, SLOTS, sizeof(SLOTS))
            self.header.newest_ms = -FARTHEST_MS
            store_release(&self.header.magic, RECENT_MAGIC)

    cdef bint _layout_matches(self) noexcept nogil:
        cdef const RecentHeader* header = self.header
        cdef int level
        if header.magic != RECENT_MAGIC or header.version != RECENT_VERSION or header.bucket_size != sizeof(Bucket):
            return False
        for level in range(RECENT_LEVELS):
            if header.widths[level] != WIDTHS[level] or header.slots[level] != SLOTS[level]:
                return False
        return True

    def _ensure_open(self):
        if self.header == NULL:
            raise ValueError("the recent ledger is closed")

    # --- writing: the record's writer thread, holding the file's lock -------------------

    def stale_unless(self, uint64_t committed_seq) -> None:
        """At start, before this instance's ledger tail drops what an earlier
        run left: unless the file holds the record through committed_seq for
        this instance (a run that died between a commit and its add did not),
        mark it unbuilt until the next add() builds it again."""
        self._ensure_open()
        with nogil:
            self._lock()
            if not self._begin_change() or self.header.committed[self.own_slot] != committed_seq:
                self.header.built = 0
            self._end_change()
            lock_file(self.fd, F_UNLCK, False)

    def add(self, uint64_t from_seq, uint64_t through_seq, settlements, int64_t now_ms) -> int:
        """Count what this instance's commit added to the record: its
        committed sequence moved from from_seq to through_seq, and
        settlements are the payments rows it inserted (correlationIds the
        record held already left out), records with cents, processor,
        requested_at_ms and generation at indexes 1 to 4. Where the file does
        not hold this instance's commits through from_seq (or a writer died
        changing it), everything is built again from the record instead.
        0, or SQLite's result code of a failed rebuild: the file then stays
        unbuilt, and summaries read the record, until a later add."""
        self._ensure_open()
        cdef Py_ssize_t count = len(settlements)
        cdef RecentRow* rows = <RecentRow*>malloc(max(count, 1) * sizeof(RecentRow))
        if rows == NULL:
            raise MemoryError("recent ledger rows")
        cdef Py_ssize_t index
        cdef int code
        try:
            for index, settlement in enumerate(settlements):
                rows[index].cents = settlement[1]
                rows[index].processor = settlement[2]
                rows[index].requested_at_ms = settlement[3]
                rows[index].generation = settlement[4]
                if rows[index].processor != 0 and rows[index].processor != 1:
                    raise ValueError(f"processor must be 0 (default) or 1 (fallback), not {rows[index].processor}")
            with nogil:
                self._lock()
                code = self._add_locked(rows, count, from_seq, through_seq, now_ms)
                lock_file(self.fd, F_UNLCK, False)
        finally:
            free(rows)
        return code

    def raise_generation(self, uint64_t generation) -> None:
        """A purge made `generation` durable in the record: count it from zero."""
        self._ensure_open()
        with nogil:
            self._lock()
            if not self._begin_change():
                self.header.built = 0
            elif generation > self.header.generation:
                self._clear_rings()
                self.header.generation = generation
            self._end_change()
            lock_file(self.fd, F_UNLCK, False)

    cdef void _lock(self) noexcept nogil:
        while lock_file(self.fd, F_WRLCK, True) != 0 and errno == EINTR:
            pass

    cdef bint _begin_change(self) noexcept nogil:
        """Make the sequence odd; False when it was already: a writer died
        midway, and nothing in the file can be trusted."""
        cdef uint64_t sequence = self.header.sequence
        if sequence & 1:
            return False
        store_then_fence(&self.header.sequence, sequence + 1)
        return True

    cdef void _end_change(self) noexcept nogil:
        store_release(&self.header.sequence, self.header.sequence + 1)

    cdef int _add_locked(self, const RecentRow* rows, Py_ssize_t count, uint64_t from_seq, uint64_t through_seq,
                         int64_t now_ms) noexcept nogil:
        cdef RecentHeader* header = self.header
        cdef uint64_t committed
        cdef Py_ssize_t index
        cdef int code = SQLITE_OK
        cdef bint whole = self._begin_change()
        committed = header.committed[self.own_slot]
        if whole and header.built and committed == from_seq:
            for index in range(count):
                self._count_row(&rows[index])
            header.committed[self.own_slot] = through_seq
        elif not (whole and header.built and committed >= through_seq):
            code = self._rebuild(now_ms)
        self._end_change()
        return code

    cdef void _count_row(self, const RecentRow* row) noexcept nogil:
        cdef RecentHeader* header = self.header
        cdef int64_t bucket
        cdef int level
        if row.generation < header.generation:
            return  # settled before a purge the file counts from
        if row.generation > header.generation:
            self._clear_rings()  # a purge another instance has not added yet
            header.generation = row.generation
        self._advance(row.requested_at_ms)
        for level in range(RECENT_LEVELS):
            bucket = floor_div(row.requested_at_ms, WIDTHS[level])
            if held(header, level, bucket):
                if row.cents < 0:
                    bucket_at(self.rings[level], level, bucket).count[row.processor] = UINT32_MAX
                else:
                    add_to_bucket(bucket_at(self.rings[level], level, bucket), row.processor, 1, row.cents)

    cdef void _advance(self, int64_t at_ms) noexcept nogil:
        """Make room up to at_ms: the buckets the rings drop are emptied."""
        cdef RecentHeader* header = self.header
        cdef int64_t old_bucket, new_bucket, bucket
        cdef int level
        if at_ms <= header.newest_ms:
            return
        for level in range(RECENT_LEVELS):
            old_bucket = floor_div(header.newest_ms, WIDTHS[level])
            new_bucket = floor_div(at_ms, WIDTHS[level])
            if new_bucket - old_bucket >= SLOTS[level]:
                memset(self.rings[level], 0, SLOTS[level] * sizeof(Bucket))
                continue
            for bucket in range(old_bucket + 1, new_bucket + 1):
                memset(bucket_at(self.rings[level], level, bucket), 0, sizeof(Bucket))
        header.newest_ms = at_ms

    cdef void _clear_rings(self) noexcept nogil:
        cdef int level
        for level in range(RECENT_LEVELS):
            memset(self.rings[level], 0, SLOTS[level] * sizeof(Bucket))

    cdef int _rebuild(self, int64_t now_ms) noexcept nogil:
        """Everything again from the record, in one read transaction: its
        generation, every instance's committed sequence, and the buckets the
        rings have room for up to now_ms. Marked built only if all of it was read."""
        cdef RecentHeader* header = self.header
        cdef sqlite3* db = NULL
        cdef int code
        header.built = 0
        self._clear_rings()
        header.newest_ms = now_ms
        memset(header.committed, 0, sizeof(header.committed))
        code = sqlite3_open_v2(self.record_text, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL)
        if code == SQLITE_OK:
            sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS)
            code = sqlite3_exec(db, b"BEGIN", NULL, NULL, NULL)
            if code == SQLITE_OK:
                code = self._read_record(db)
                sqlite3_exec(db, b"COMMIT", NULL, NULL, NULL)
        sqlite3_close_v2(db)
        if code == SQLITE_OK:
            header.built = 1
        return code

    cdef int _read_record(self, sqlite3* db) noexcept nogil:
        cdef RecentHeader* header = self.header
        cdef sqlite3_stmt* statement = NULL
        cdef int code, level, slot, length
        cdef int64_t start
        cdef uint64_t low, high
        code = self._prepare(db, 0, &statement)
        if code != SQLITE_OK:
            return code
        code = sqlite3_step(statement)
        if code == SQLITE_ROW:
            header.generation = sqlite3_column_int64(statement, 0)
            code = SQLITE_DONE
        sqlite3_finalize(statement)
        if code != SQLITE_DONE:
            return code
        code = self._prepare(db, 1, &statement)
        if code != SQLITE_OK:
            return code
        while True:
            code = sqlite3_step(statement)
            if code != SQLITE_ROW:
                break
            length = sqlite3_column_bytes(statement, 0)
            slot = -1
            if 0 < length <= INSTANCE_NAME_MAX:
                slot = register_name(header.names, <const char*>sqlite3_column_text(statement, 0), length)
            if slot < 0:
                code = SQLITE_FULL
                break
            header.committed[slot] = sqlite3_column_int64(statement, 1)
        sqlite3_finalize(statement)
        if code != SQLITE_DONE:
            return code
        for level in range(RECENT_LEVELS):
            code = self._prepare(db, 2 + level, &statement)
            if code != SQLITE_OK:
                return code
            sqlite3_bind_int64(statement, 1, header.generation)
            sqlite3_bind_int64(statement, 2, (floor_div(header.newest_ms, WIDTHS[level]) - SLOTS[level] + 1)
                               * WIDTHS[level])
            while True:
                code = sqlite3_step(statement)
                if code != SQLITE_ROW:
                    break
                start = sqlite3_column_int64(statement, 0)
                low = sqlite3_column_int64(statement, 3)
                high = <uint64_t>sqlite3_column_int64(statement, 4) + (low >> 32)
                self._advance(start)
                self._add_bucket(level, floor_div(start, WIDTHS[level]), sqlite3_column_int64(statement, 1),
                                 sqlite3_column_int64(statement, 2), (high << 32) | (low & LOW_BITS),
                                 high >> 32 == 0)
            sqlite3_finalize(statement)
            if code != SQLITE_DONE:
                return code
        return SQLITE_OK

    cdef int _prepare(self, sqlite3* db, int index, sqlite3_stmt** statement) noexcept nogil:
        return sqlite3_prepare_v2(db, self.rebuild_text[index], -1, statement, NULL)

    cdef void _add_bucket(self, int level, int64_t bucket, int64_t processor, int64_t count, uint64_t cents,
                          bint fits) noexcept nogil:
        cdef Bucket* target
        if processor != 0 and processor != 1 or not held(self.header, level, bucket):
            return
        target = bucket_at(self.rings[level], level, bucket)
        if not fits or count < 0:
            target.count[processor] = UINT32_MAX
        else:
            add_to_bucket(target, processor, count, cents)

    # --- reading: any instance's event loop, without the lock --------------------------

    def totals(self, uint64_t generation, from_ms, to_ms):
        """The record's totals of `generation` for requestedAt in [from_ms,
        to_ms] (inclusive; to_ms None: unbounded), as far as the rings hold
        them: (totals, committed, covered_from, covered_to). The totals
        (default count, default cents, fallback count, fallback cents) are of
        [covered_from, covered_to]: the range, less at most a few
        milliseconds at each end that lie before the 1 ms ring (the caller
        reads those from the record). committed: every instance's committed
        sequence they hold, as a read of the record gives it. None when the
        file cannot tell: from_ms None or beyond the rings, not built,
        another generation, a sum that overflowed, a writer at work."""
        self._ensure_open()
        if from_ms is None or not -FARTHEST_MS <= from_ms <= FARTHEST_MS:
            return None
        cdef int64_t first = from_ms
        cdef int64_t last = FARTHEST_MS if to_ms is None else max(min(to_ms, FARTHEST_MS), -FARTHEST_MS)
        cdef int64_t covered[2]
        cdef ProcessorSums sums
        cdef uint64_t committed[REGISTRY_SLOTS]
        cdef uint64_t sequence
        cdef Coverage coverage = UNKNOWN
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            sequence = load_acquire(&self.header.sequence)
            if sequence & 1:
                continue
            coverage = self._sum(generation, first, last, &sums, covered)
            memcpy(committed, self.header.committed, sizeof(committed))
            fence_acquire()
            if load_relaxed(&self.header.sequence) == sequence:
                break
            coverage = UNKNOWN
        if coverage != COVERED:
            return None
        cdef int slot
        seqs = {}
        for slot in range(REGISTRY_SLOTS):
            if load_acquire(&self.header.names[slot].name_length):
                seqs[slot_name(&self.header.names[slot])] = committed[slot]
        return sums_tuple(&sums), seqs, covered[0], to_ms if covered[1] == last else covered[1]

    cdef Coverage _sum(self, uint64_t generation, int64_t first, int64_t last, ProcessorSums* sums,
                       int64_t* covered) noexcept nogil:
        """Sum [first, last] as record_ranges.plan_range splits a range, over
        the rings' widths: the coarsest whole buckets, then finer ones on
        each side; the 1 ms runs at the ends may lie before the 1 ms ring and
        are then left out of `covered`."""
        cdef const RecentHeader* header = self.header
        cdef int64_t begin, end, left, right, width, start, stop
        cdef int level, finer
        cdef Coverage coverage
        memset(sums, 0, sizeof(ProcessorSums))
        covered[0], covered[1] = first, last
        if not header.built or header.generation != generation:
            return UNKNOWN
        begin, end = first, min(last, header.newest_ms) + 1   # nothing lies after newest_ms
        if begin >= end:
            return COVERED
        for level in range(RECENT_LEVELS - 1, -1, -1):
            width = WIDTHS[level]
            left, right = align_up(begin, width), floor_div(end, width) * width
            if left < right:
                break
        coverage = self._sum_run(level, left, right - width, sums)
        if coverage != COVERED:
            return coverage
        for finer in range(level - 1, -1, -1):
            width = WIDTHS[finer]
            start = align_up(begin, width)
            if start < left:
                coverage = self._sum_run(finer, start, left - width, sums)
                if coverage == TOO_OLD and finer == 0:
                    covered[0] = left
                elif coverage != COVERED:
                    return coverage
                left = start
            stop = floor_div(end, width) * width
            if stop > right:
                coverage = self._sum_run(finer, right, stop - width, sums)
                if coverage == TOO_OLD and finer == 0:
                    covered[1] = right - 1
                elif coverage != COVERED:
                    return coverage
                right = stop
        return COVERED

    cdef Coverage _sum_run(self, int level, int64_t first_start, int64_t last_start, ProcessorSums* sums) noexcept nogil:
        cdef const Bucket* bucket
        cdef int64_t index, first = floor_div(first_start, WIDTHS[level])
        cdef int64_t last = min(floor_div(last_start, WIDTHS[level]), floor_div(self.header.newest_ms, WIDTHS[level]))
        cdef int processor
        if not held(self.header, level, first):
            return TOO_OLD
        for index in range(first, last + 1):
            bucket = bucket_at(self.rings[level], level, index)
            for processor in range(RECENT_PROCESSORS):
                if bucket.count[processor] == UINT32_MAX:
                    return INEXACT
                add_payments(sums, processor, bucket.count[processor], bucket.cents[processor])
        return COVERED

    def close(self) -> None:
        self._release()

    cdef void _release(self) noexcept nogil:
        if self.base != NULL:
            munmap(self.base, self.mapped_size)
            self.base = NULL
            self.header = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
