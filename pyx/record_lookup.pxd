# Lookups of correlationIds in the payments record (SQLite), answered by a
# thread that never takes the GIL: the event loop hands ids over and reads the
# answers when event_fd is readable. A paid-before check costs the loop an
# append and one wake-up, not a trip through the interpreter on another thread.
from libc.stdint cimport int64_t

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.loop_threads cimport pthread_cond_t, pthread_mutex_t


cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3:
        pass
    ctypedef struct sqlite3_stmt:
        pass


cpdef enum LookupStatus:
    ABSENT = 0        # the record does not hold the id
    FOUND = 1         # it does: cents, processor, requested_at_ms
    FAILED = 2        # the read failed (error: SQLite's result code)


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


cdef class RecordLookup:
    cdef readonly str path
    cdef readonly int event_fd
    cdef sqlite3* db
    cdef sqlite3_stmt* statement
    cdef pthread_mutex_t mutex
    cdef pthread_cond_t work_ready
    # Under mutex: the ids asked and not yet taken by the thread (answers
    # unset), the answers not yet read by the loop, and how many ids are asked
    # and not yet read (answered has room for them all: the thread never
    # allocates).
    cdef AnswerList asked
    cdef AnswerList answered
    cdef Py_ssize_t unread
    cdef bint serving
    cdef bint closing

    cdef void serve_raw(self) noexcept nogil
    cdef void answer(self, LookupAnswer* item) noexcept nogil
