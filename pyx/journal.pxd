# The write-ahead log of one service instance: what it promised (a payment
# accepted), what it tried (a payment sent to a processor) and what it knows
# (a payment a processor holds). Replayed at start to finish what a killed
# process left undone.
#
# A directory of segments, <first sequence number>.seg, each a SegmentHeader
# then JournalRecords. Every record carries a checksum, so a record torn by a
# crash ends the replay of its segment instead of being misread. The event
# loop appends records to a batch in memory; a writer thread (serve()) writes
# each batch with one write (and fdatasync when sync is on) without the GIL,
# keeps the index of payments still outstanding, starts a new segment with a
# checkpoint of that index once a segment is full, and deletes the segments
# whose settlements the payments record has committed.
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from paycore.core.accepted_ids cimport AcceptedIds
from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.loop_threads cimport pthread_cond_t, pthread_mutex_t


cpdef enum RecordKind:
    ACCEPTED = 1      # uuid, cents: written before the 2xx
    SENDING = 2       # uuid, processor, requestedAt: written before the request leaves
    SETTLED = 3       # uuid, processor, requestedAt (as the processor holds it), cents, generation
    DISCARDED = 4     # uuid: no longer this instance's to deliver (already paid, per the record)
    OUTSTANDING = 5   # checkpoint: uuid, cents, and the last send if flags has SENT


cdef enum:
    RECORD_SENT = 1   # OUTSTANDING: processor and requestedAt hold its last send


cdef struct SegmentHeader:
    uint64_t magic
    uint32_t version
    uint32_t record_size
    uint64_t first_seq         # the sequence number of the first appended record it holds
    uint64_t reserved


cdef struct JournalRecord:
    uint32_t checksum          # FNV-1a over the bytes after this field
    uint8_t kind
    uint8_t processor
    uint16_t flags
    uint32_t generation        # SETTLED: the ledger's purge generation
    uint32_t reserved
    uint64_t seq               # appended records: 1, 2, 3, ...; checkpoint records: 0
    unsigned char uuid[UUID_BYTES]
    int64_t cents
    int64_t requested_at_ms


# The payments outstanding (accepted, not settled or discarded), by uuid:
# open addressing, linear probing, deletion by backward shift.
cdef struct OutstandingEntry:
    unsigned char uuid[UUID_BYTES]
    int64_t cents
    int64_t requested_at_ms
    uint8_t occupied
    uint8_t processor
    uint16_t flags             # RECORD_SENT


cdef struct OutstandingIndex:
    OutstandingEntry* entries
    Py_ssize_t capacity        # a power of two
    Py_ssize_t count


# A growable array of records.
cdef struct RecordBuffer:
    JournalRecord* records
    Py_ssize_t count
    Py_ssize_t capacity




@cython.final
cdef class Journal:
    cdef readonly str directory
    cdef readonly bint sync
    cdef int64_t segment_limit      # bytes after which the writer starts a new segment
    cdef int lock_fd
    cdef int directory_fd
    cdef int event_fd               # the writer signals the loop here after each batch

    # Appended by the event loop, not yet handed to the writer.
    cdef RecordBuffer open_batch
    cdef uint64_t next_seq

    # Handed over under the mutex.
    cdef pthread_mutex_t mutex
    cdef pthread_cond_t work_ready
    cdef RecordBuffer submitted
    cdef int closing                # stop() was called (read by the writer with atomics)
    cdef bint serving
    cdef bint served                # serve() began: it runs once, even after a stop()
    cdef bint closed                # close() released the files
    cdef int deletion_due           # committed_seq moved: segments may go (raise_and_wake)
    cdef bint recovered
    # Written on the caller's thread (open_here), no writer thread: the loop's own.
    cdef bint here

    # The writer's own (and the recovery's, before it starts).
    cdef RecordBuffer writing
    cdef OutstandingIndex index
    cdef int segment_fd
    cdef int64_t segment_size
    cdef uint64_t* segment_starts   # first_seq of every segment on disk, oldest first
    cdef Py_ssize_t segment_count
    cdef Py_ssize_t segment_starts_capacity
    # The ids of outstanding payments are remembered again in it at each new
    # epoch, so a payment pending longer than the window stays known.
    cdef AcceptedIds pending_ids
    cdef int64_t pending_ids_epoch

    # Read with atomics across the two threads.
    cdef uint64_t durable_seq       # written by the writer
    cdef uint64_t committed_seq     # written by the loop: the payments record holds every settlement up to it
    cdef int write_errno            # the writer's last failure; 0 once a write succeeds
    cdef uint64_t batches_written
    cdef uint64_t records_written
    cdef uint64_t outstanding_count

    cdef uint64_t append(self, RecordKind kind, const unsigned char* uuid16, int processor, int64_t cents,
                         int64_t requested_at_ms, uint32_t generation) except 0
    cdef int write_batch(self, RecordBuffer* batch) noexcept nogil
    cdef int start_segment(self) noexcept nogil
    cdef int write_checkpoint(self, int fd, const SegmentHeader* header, int64_t* size) noexcept nogil
    cdef int _remember_segment_raw(self, uint64_t first_seq) noexcept nogil
    cdef void serve_raw(self) noexcept nogil
    cdef void finish_serving(self) noexcept nogil
    cdef void notify_loop(self) noexcept nogil
    cdef void delete_committed_segments(self) noexcept nogil
    cdef void remember_pending_ids(self) noexcept nogil
