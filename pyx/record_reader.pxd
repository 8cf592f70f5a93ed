# The event loop's reads of the payments record (SQLite), answered by a thread
# that never takes the GIL: lookups of correlationIds (one before every send)
# and summaries. The loop hands work over and reads the answers when event_fd
# is readable: a read costs the loop an append and one wake-up, not a trip
# through the interpreter on another thread. A record in memory is read
# inline instead (InlineReads): there a lookup or a summary is a few tens of
# microseconds that never wait for a device, cheaper than the two wake-ups of
# a hand-over.
from libc.stdint cimport int64_t

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.instance_registry cimport INSTANCE_NAME_MAX
from paycore.core.loop_threads cimport pthread_cond_t, pthread_mutex_t
from paycore.core.sqlite3_api cimport sqlite3, sqlite3_stmt


cpdef enum LookupStatus:
    ABSENT = 0        # the record does not hold the id
    FOUND = 1         # it does: cents, processor, requested_at_ms
    FAILED = 2        # the read failed (error: SQLite's result code)


cdef enum:
    # The generation, three per bucket run, two per edge (record_ranges.py).
    MAX_SUMMARY_PARAMETERS = 64
    PROCESSORS = 2


cdef struct LookupAnswer:
    unsigned char uuid[UUID_BYTES]
    int status
    int processor
    int error
    int64_t cents
    int64_t requested_at_ms


cdef struct AnswerList:
    LookupAnswer* items
    Py_ssize_t count
    Py_ssize_t capacity


cdef struct CommittedSeq:
    char instance[INSTANCE_NAME_MAX + 1]
    int64_t journal_seq


cdef struct SummaryAnswer:
    # Asked: which prepared statement, and its parameters.
    int statement
    int parameter_count
    int64_t parameters[MAX_SUMMARY_PARAMETERS]
    # Answered: error 0, or SQLite's result code (nothing else is set).
    int error
    int64_t count[PROCESSORS]
    int64_t cents_low[PROCESSORS]
    int64_t cents_high[PROCESSORS]
    # Allocated by the thread, freed once the loop has read them.
    CommittedSeq* committed
    Py_ssize_t committed_count


# The prepared statement of each shape of summary (record_sql.SUMMARY_STATEMENTS).
cdef struct SummaryStatements:
    sqlite3_stmt** statements
    int count


cdef struct SummaryList:
    SummaryAnswer* items
    Py_ssize_t count
    Py_ssize_t capacity


cdef class RecordReader:
    cdef readonly str path
    cdef readonly int event_fd
    cdef sqlite3* db
    cdef sqlite3_stmt* lookup_statement
    cdef SummaryStatements summaries
    cdef pthread_mutex_t mutex
    cdef pthread_cond_t work_ready
    # Under mutex: the work asked and not yet taken by the thread (answers
    # unset), the answers not yet read by the loop, and how many are asked and
    # not yet read (the answered lists have room for them all: the thread
    # never grows them).
    cdef AnswerList asked
    cdef AnswerList answered
    cdef Py_ssize_t unread
    cdef SummaryList summaries_asked
    cdef SummaryList summaries_answered
    cdef Py_ssize_t summaries_unread
    cdef bint serving
    cdef int closing      # set by stop() (loop_threads.raise_and_wake)

    cdef void serve_raw(self) noexcept nogil


cdef class InlineReads:
    cdef readonly str path
    cdef sqlite3* db
    cdef sqlite3_stmt* lookup_statement
    cdef SummaryStatements summaries
