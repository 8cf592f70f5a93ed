# The recent past of the payments record, in shared memory: every instance of a
# host reads summaries of the last hour from it without a query, and the record's
# writers keep it, each after its own commits.
#
# File in the shared directory (a tmpfs in production): recent-ledger.shm,
# a RecentHeader, then one ring of Buckets per level. Level widths are 1 ms,
# 10 ms, 100 ms, 1 s and 1 min (the record's own, with 1 ms below them); each
# ring holds the latest `slots` buckets of its width up to newest_ms, so the
# 1 ms level reaches about two minutes back and the others an hour. A range is
# summed as its coarsest whole buckets plus at most nine (or 59) of each finer
# width on each side: a few hundred additions, whatever the rate.
#
# What it holds is what the record has committed, through committed[slot] for
# the instance of each registry slot: a summary adds what each instance's
# ledger tail holds above that, exactly as it does to a read of the record.
#
# Writers take the file's lock (an open-file-description lock, dropped when a
# writer dies) and make `sequence` odd while they change anything; readers take
# no lock: they read, then check that `sequence` is the same even number, or
# give up (the caller reads the record instead). A writer that died midway
# leaves `sequence` odd: the next writer rebuilds everything from the record.
from libc.stdint cimport int64_t, uint32_t, uint64_t

from paycore.core.instance_registry cimport REGISTRY_SLOTS, RegistrySlot
from paycore.core.processor_sums cimport ProcessorSums
from paycore.core.sqlite3_api cimport sqlite3, sqlite3_stmt


cdef enum:
    RECENT_LEVELS = 5
    RECENT_PROCESSORS = 2
    REBUILD_STATEMENTS = 2 + RECENT_LEVELS   # the generation, the committed sequences, one per level


# The payments of one bucket, per processor. A count of UINT32_MAX marks a
# bucket whose sums no longer fit: ranges that need it are read from the record.
cdef struct Bucket:
    uint64_t cents[RECENT_PROCESSORS]
    uint32_t count[RECENT_PROCESSORS]


cdef struct RecentHeader:
    uint64_t magic
    uint32_t version
    uint32_t bucket_size
    int64_t widths[RECENT_LEVELS]
    int64_t slots[RECENT_LEVELS]
    uint64_t sequence          # even: what follows is whole; odd: a writer is changing it (or died doing so)
    uint64_t built             # 1: the buckets hold the record's recent past through committed[]
    uint64_t generation        # the purge generation the buckets count
    int64_t newest_ms          # the latest millisecond the rings have room for
    uint64_t committed[REGISTRY_SLOTS]
    RegistrySlot names[REGISTRY_SLOTS]


# What a sum over the rings found.
cdef enum Coverage:
    COVERED = 0
    TOO_OLD = 1                # a bucket the rings no longer hold
    INEXACT = 2                # a bucket whose sums overflowed
    UNKNOWN = 3                # not built, or another generation


# A settlement to count, copied out of its Python record before the lock is taken.
cdef struct RecentRow:
    int64_t requested_at_ms
    int64_t cents
    uint64_t generation
    int processor


cdef class RecentLedger:
    cdef int fd
    cdef char* base
    cdef size_t mapped_size
    cdef RecentHeader* header
    cdef Bucket* rings[RECENT_LEVELS]
    cdef int own_slot
    cdef bytes record_path
    cdef const char* record_text   # into record_path, read without the GIL
    cdef list rebuild_sql          # bytes, one per REBUILD_STATEMENTS
    cdef const char* rebuild_text[REBUILD_STATEMENTS]   # into rebuild_sql, read without the GIL
    cdef readonly str path
    cdef readonly str instance

    cdef bint _layout_matches(self) noexcept nogil
    cdef void _lock(self) noexcept nogil
    cdef bint _begin_change(self) noexcept nogil
    cdef void _end_change(self) noexcept nogil
    cdef int _add_locked(self, const RecentRow* rows, Py_ssize_t count, uint64_t from_seq, uint64_t through_seq,
                         int64_t now_ms) noexcept nogil
    cdef void _count_row(self, const RecentRow* row) noexcept nogil
    cdef void _advance(self, int64_t at_ms) noexcept nogil
    cdef void _clear_rings(self) noexcept nogil
    cdef int _rebuild(self, int64_t now_ms) noexcept nogil
    cdef int _read_record(self, sqlite3* db) noexcept nogil
    cdef int _prepare(self, sqlite3* db, int index, sqlite3_stmt** statement) noexcept nogil
    cdef void _add_bucket(self, int level, int64_t bucket, int64_t processor, int64_t count, uint64_t cents,
                          bint fits) noexcept nogil
    cdef Coverage _sum(self, uint64_t generation, int64_t first, int64_t last, ProcessorSums* sums,
                       int64_t* covered) noexcept nogil
    cdef Coverage _sum_run(self, int level, int64_t first_start, int64_t last_start, ProcessorSums* sums) noexcept nogil
    cdef void _release(self) noexcept nogil
