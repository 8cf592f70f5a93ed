# The append-only journal of one service instance: what it promised (a payment
# accepted), what it tried (a payment sent to a processor) and what it knows
# (a payment recorded by a processor). Replayed at start to finish what a
# killed process left undone and to rebuild its share of the ledger.
#
# File: a FileHeader, then JournalRecords. Each record carries a checksum, so a
# record torn by a crash ends the replay instead of being misread.
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from paycore.core.correlation_id cimport UUID_BYTES


cpdef enum RecordKind:
    ACCEPTED = 1   # uuid, cents: written before the 2xx
    SENDING = 2    # uuid, processor, requestedAt: written before the request leaves
    SETTLED = 3    # uuid, processor, requestedAt (as the processor holds it), cents


cdef struct FileHeader:
    uint64_t magic
    uint32_t version
    uint32_t record_size


cdef struct JournalRecord:
    uint32_t checksum          # FNV-1a over the bytes after this field
    uint8_t kind
    uint8_t processor
    uint16_t reserved
    uint64_t generation        # the ledger's purge generation when written
    unsigned char uuid[UUID_BYTES]
    int64_t cents
    int64_t requested_at_ms


@cython.final
cdef class Journal:
    cdef int fd
    cdef JournalRecord* buffer  # appended, not yet written
    cdef Py_ssize_t buffered
    cdef Py_ssize_t buffer_capacity
    cdef int64_t durable_size   # bytes of whole records in the file
    cdef readonly str path
    cdef readonly bint sync

    cdef int start_file(self) except -1
    cdef int append(self, RecordKind kind, const unsigned char* uuid16, int processor,
                    int64_t cents, int64_t requested_at_ms, uint64_t generation) except -1
