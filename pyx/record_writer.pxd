# The payments record's commits, made on the caller's thread (the record's
# writer thread) with the GIL let go for the whole transaction: the inserts,
# the buckets, the committed sequence and the COMMIT take it back once, not
# once per statement, so an event loop that wakes meanwhile rarely waits for it.
from libc.stdint cimport int64_t

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.sqlite3_api cimport sqlite3, sqlite3_stmt

cdef enum:
    COLUMNS_PER_ROW = 5   # the parameters of one payment in INSERT_PAYMENT(S)


# The statements of a commit, in the order it runs them.
cdef enum:
    BEGIN_IMMEDIATE
    INSERT_PAYMENT        # ?1 correlation_id, ?2 cents, ?3 processor, ?4 requested_at_ms, ?5 generation
    INSERT_PAYMENTS       # the same for several payments: rows_per_insert of them
    COUNT_FRESH           # how many rows this transaction inserted
    FRESH_ROWS            # cents, processor, requested_at_ms, generation of each
    ADD_FRESH_TO_BUCKETS
    FORGET_FRESH
    ADVANCE_COMMITTED     # ?1 instance, ?2 journal_seq
    COMMIT
    ROLLBACK
    COMMIT_STEPS


cdef enum:
    FAILURE_BYTES = 256


cdef struct SettlementRow:
    unsigned char correlation_id[UUID_BYTES]
    int64_t cents
    int64_t processor
    int64_t requested_at_ms
    int64_t generation


cdef struct FreshRow:
    int64_t cents
    int64_t processor
    int64_t requested_at_ms
    int64_t generation


cdef class RecordWriter:
    cdef readonly str path
    cdef sqlite3* db
    cdef sqlite3_stmt* steps[COMMIT_STEPS]
    cdef int rows_per_insert
    # What SQLite said of the last failed commit, kept past its rollback.
    cdef char failure[FAILURE_BYTES]

    cdef int _commit(self, const SettlementRow* rows, Py_ssize_t count, const char* instance,
                     int instance_bytes, int64_t through_seq, FreshRow** fresh,
                     Py_ssize_t* fresh_count) noexcept nogil
    cdef int _insert(self, int step, const SettlementRow* rows, int count) noexcept nogil
    cdef int _step(self, int step) noexcept nogil
    cdef int _roll_back(self, int code) noexcept nogil
    cdef object _error(self, int code, const char* message)
