"""The instance journal: checksummed records in segments, appended by the event
loop and written, synced, checkpointed and deleted by a writer thread that
never holds the GIL, or, for a journal in memory, by the loop itself."""
import os
import re

from libc.errno cimport EAGAIN, EEXIST, EINTR, ENOENT, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.fcntl cimport O_APPEND, O_CLOEXEC, O_CREAT, O_DIRECTORY, O_RDONLY, O_TRUNC, O_WRONLY
from posix.fcntl cimport open as open_file
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, nanosleep, timespec
from posix.unistd cimport close, fsync, pwrite, read, write

from cpython.bytes cimport PyBytes_FromStringAndSize

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.loop_threads cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, eventfd, grow_array, pthread_cond_destroy, pthread_cond_init,
    pthread_cond_timedwait, pthread_cond_wait, pthread_mutex_destroy, pthread_mutex_init,
    pthread_mutex_lock, pthread_mutex_unlock, raise_and_wake, unlock_and_wake,
)
from paycore.core.posix_files cimport on_memory_filesystem, open_or_raise, raise_os_error


cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int operation)
    enum: LOCK_EX
    enum: LOCK_NB


cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)


cdef extern from "<fcntl.h>" nogil:
    int openat(int dirfd, const char* path, int flags, ...)
    int posix_fallocate(int fd, long offset, long length)
    int renameat(int olddirfd, const char* oldpath, int newdirfd, const char* newpath)
    int unlinkat(int dirfd, const char* path, int flags)


cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t journal_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void journal_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int journal_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void journal_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void journal_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    uint64_t atomic_load "journal_load"(const uint64_t* pointer) nogil
    void atomic_store "journal_store"(uint64_t* pointer, uint64_t value) nogil
    int atomic_load_int "journal_load_int"(const int* pointer) nogil
    void atomic_store_int "journal_store_int"(int* pointer, int value) nogil
    void cpu_relax "journal_cpu_relax"() nogil


cdef enum:
    FILE_MODE = 0o644
    JOURNAL_VERSION = 2
    READ_CHUNK_RECORDS = 4096
    CHECKPOINT_CHUNK_RECORDS = 256
    INITIAL_BUFFER_RECORDS = 256
    INITIAL_INDEX_CAPACITY = 1024
    SEGMENT_NAME_MAX = 32
    RECOVERED_CHUNK = 8192
    RETRY_AFTER_ERROR_NS = 50 * 1000 * 1000

cdef uint64_t SEGMENT_MAGIC = 0x4c4e524a59415032ULL  # "2PAYJRNL"
DEFAULT_SEGMENT_BYTES = 8 << 20
SEGMENT_SUFFIX = ".seg"
_SEGMENT_NAME = re.compile(r"(\d{20})\.seg")

assert sizeof(JournalRecord) == 56


# --- records ---------------------------------------------------------------------

cdef uint32_t record_checksum(const JournalRecord* record) noexcept nogil:
    cdef const uint8_t* data = <const uint8_t*>record
    cdef uint32_t hash = 2166136261U
    cdef size_t i
    for i in range(sizeof(uint32_t), sizeof(JournalRecord)):
        hash = (hash ^ data[i]) * 16777619U
    return hash


cdef void fill_record(JournalRecord* record, RecordKind kind, uint64_t seq, const unsigned char* uuid16,
                      int processor, int flags, int64_t cents, int64_t requested_at_ms,
                      uint32_t generation) noexcept nogil:
    memset(record, 0, sizeof(JournalRecord))
    record.kind = kind
    record.processor = processor
    record.flags = flags
    record.generation = generation
    record.seq = seq
    memcpy(record.uuid, uuid16, UUID_BYTES)
    record.cents = cents
    record.requested_at_ms = requested_at_ms
    record.checksum = record_checksum(record)


cdef bint record_is_valid(const JournalRecord* record) noexcept nogil:
    return (record.checksum == record_checksum(record)
            and ACCEPTED <= record.kind <= OUTSTANDING and record.processor <= 1)


cdef int write_all(int fd, const char* data, Py_ssize_t size, int64_t offset) noexcept nogil:
    """0, or -1 with errno set; a short write is continued, EINTR retried."""
    cdef Py_ssize_t written
    while size > 0:
        written = pwrite(fd, data, size, offset)
        if written < 0:
            if errno == EINTR:
                continue
            return -1
        data += written
        offset += written
        size -= written
    return 0


cdef Py_ssize_t read_full(int fd, char* data, Py_ssize_t size) noexcept nogil:
    """Bytes read (fewer only at the end of the file), or -1 with errno set."""
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t got
    while total < size:
        got = read(fd, data + total, size - total)
        if got < 0:
            if errno == EINTR:
                continue
            return -1
        if got == 0:
            break
        total += got
    return total


cdef void segment_name(char* out, uint64_t first_seq, bint temporary) noexcept nogil:
    snprintf(out, SEGMENT_NAME_MAX, "%020llu.seg%s", <unsigned long long>first_seq,
             b".tmp" if temporary else b"")


# --- record buffers ----------------------------------------------------------------

cdef inline int buffer_reserve(RecordBuffer* buffer, Py_ssize_t wanted) noexcept nogil:
    """0, or -1 when memory is short."""
    return grow_array(<void**>&buffer.records, &buffer.capacity, wanted, sizeof(JournalRecord),
                      INITIAL_BUFFER_RECORDS)


cdef int buffer_take(RecordBuffer* target, RecordBuffer* source) noexcept nogil:
    """Move source's records to the end of target; -1 when memory is short (nothing moved)."""
    if target.count == 0:
        target.records, source.records = source.records, target.records
        target.capacity, source.capacity = source.capacity, target.capacity
        target.count, source.count = source.count, 0
        return 0
    if buffer_reserve(target, target.count + source.count) != 0:
        return -1
    memcpy(&target.records[target.count], source.records, source.count * sizeof(JournalRecord))
    target.count += source.count
    source.count = 0
    return 0


# --- the index of outstanding payments -----------------------------------------------

cdef inline uint64_t uuid_hash(const unsigned char* uuid16) noexcept nogil:
    cdef uint64_t high, low, mixed
    memcpy(&high, uuid16, 8)
    memcpy(&low, uuid16 + 8, 8)
    mixed = high ^ (low * 0x9E3779B97F4A7C15ULL)
    mixed ^= mixed >> 33
    mixed *= 0xFF51AFD7ED558CCDULL
    mixed ^= mixed >> 33
    return mixed


cdef int index_init(OutstandingIndex* index, Py_ssize_t capacity) noexcept nogil:
    index.entries = <OutstandingEntry*>calloc(capacity, sizeof(OutstandingEntry))
    if index.entries == NULL:
        return -1
    index.capacity = capacity
    index.count = 0
    return 0


cdef Py_ssize_t index_slot(const OutstandingIndex* index, const unsigned char* uuid16) noexcept nogil:
    """The slot holding uuid16, or the free slot where it would go."""
    cdef Py_ssize_t mask = index.capacity - 1
    cdef Py_ssize_t slot = <Py_ssize_t>(uuid_hash(uuid16) & <uint64_t>mask)
    while index.entries[slot].occupied and memcmp(index.entries[slot].uuid, uuid16, UUID_BYTES) != 0:
        slot = (slot + 1) & mask
    return slot


cdef int index_grow(OutstandingIndex* index) noexcept nogil:
    cdef OutstandingIndex grown
    cdef Py_ssize_t i
    if index_init(&grown, index.capacity * 2) != 0:
        return -1
    for i in range(index.capacity):
        if index.entries[i].occupied:
            grown.entries[index_slot(&grown, index.entries[i].uuid)] = index.entries[i]
    grown.count = index.count
    free(index.entries)
    index[0] = grown
    return 0


cdef int index_insert(OutstandingIndex* index, const JournalRecord* record, bint with_send) noexcept nogil:
    """Add the payment unless it is there: -1 when memory is short."""
    cdef Py_ssize_t slot
    cdef OutstandingEntry* entry
    if (index.count + 1) * 10 > index.capacity * 7 and index_grow(index) != 0:
        return -1
    slot = index_slot(index, record.uuid)
    entry = &index.entries[slot]
    if entry.occupied:
        return 0
    memcpy(entry.uuid, record.uuid, UUID_BYTES)
    entry.cents = record.cents
    entry.occupied = 1
    entry.flags = RECORD_SENT if with_send else 0
    entry.processor = record.processor if with_send else 0
    entry.requested_at_ms = record.requested_at_ms if with_send else 0
    index.count += 1
    return 0


cdef void index_remove(OutstandingIndex* index, const unsigned char* uuid16) noexcept nogil:
    cdef Py_ssize_t mask = index.capacity - 1
    cdef Py_ssize_t hole = index_slot(index, uuid16)
    cdef Py_ssize_t probe = hole
    cdef Py_ssize_t home
    if not index.entries[hole].occupied:
        return
    while True:
        probe = (probe + 1) & mask
        if not index.entries[probe].occupied:
            break
        home = <Py_ssize_t>(uuid_hash(index.entries[probe].uuid) & <uint64_t>mask)
        # The entry at probe stays unless its home lies cyclically outside (hole, probe].
        if (hole < home <= probe) if hole <= probe else (hole < home or home <= probe):
            continue
        index.entries[hole] = index.entries[probe]
        hole = probe
    index.entries[hole].occupied = 0
    index.count -= 1


cdef int index_apply(OutstandingIndex* index, const JournalRecord* record) noexcept nogil:
    """Fold one record into the index; -1 when memory is short."""
    cdef Py_ssize_t slot
    cdef OutstandingEntry* entry
    if record.kind == ACCEPTED:
        return index_insert(index, record, False)
    if record.kind == OUTSTANDING:
        return index_insert(index, record, record.flags & RECORD_SENT)
    if record.kind == SENDING:
        slot = index_slot(index, record.uuid)
        entry = &index.entries[slot]
        if entry.occupied:
            entry.flags = RECORD_SENT
            entry.processor = record.processor
            entry.requested_at_ms = record.requested_at_ms
        return 0
    index_remove(index, record.uuid)  # SETTLED, DISCARDED
    return 0


# --- argument checks ---------------------------------------------------------------

cdef const unsigned char* checked_uuid(bytes uuid16) except NULL:
    if len(uuid16) != UUID_BYTES:
        raise ValueError(f"a UUID is {UUID_BYTES} bytes, got {len(uuid16)}")
    return uuid16


cdef int checked_processor(int processor) except -1:
    if processor != 0 and processor != 1:
        raise ValueError(f"processor must be 0 (default) or 1 (fallback), not {processor}")
    return processor


cdef uint32_t checked_generation(uint64_t generation) except? 0xFFFFFFFF:
    if generation >= 0xFFFFFFFF:
        raise ValueError(f"purge generation {generation} is out of range")
    return <uint32_t>generation


cdef void pause_after_error() noexcept nogil:
    cdef timespec wait
    wait.tv_sec = 0
    wait.tv_nsec = RETRY_AFTER_ERROR_NS
    nanosleep(&wait, NULL)


cdef class Journal:
    """The journal of one instance in `directory` (created if missing), held
    with an exclusive lock so two processes never write it at once.

    Use: recover() what a previous run left, then run serve() in a thread of
    its own; append from the event loop (accepted, sending, settled,
    discarded: each returns the record's sequence number), submit() at the
    end of each batch, and read durable_seq when event_fd is readable. Tell it
    committed_seq as the payments record commits settlements: segments whose
    settlements are all committed are deleted. stop() then close() at the end.

    A journal in memory (`in_memory`) may instead be written on the loop's
    own thread: open_here() once, write_here() at the end of each batch,
    maintain() at least once a second, close() at the end.
    """

    def __cinit__(self):
        pthread_mutex_init(&self.mutex, NULL)
        pthread_cond_init(&self.work_ready, NULL)
        self.lock_fd = -1
        self.directory_fd = -1
        self.event_fd = -1
        self.segment_fd = -1

    def __init__(self, str directory, bint sync=False, int64_t segment_bytes=DEFAULT_SEGMENT_BYTES):
        if segment_bytes < <int64_t>(sizeof(SegmentHeader) + sizeof(JournalRecord)):
            raise ValueError(f"segment_bytes is too small: {segment_bytes}")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.sync = sync
        self.segment_limit = segment_bytes
        self.lock_fd = open_or_raise(os.path.join(directory, "lock"), O_WRONLY | O_CREAT, FILE_MODE)
        if flock(self.lock_fd, LOCK_EX | LOCK_NB) != 0:
            if errno == EAGAIN:
                self._release_descriptors()
                raise RuntimeError(f"the journal {directory} is open in another process")
            raise_os_error(directory)
        self.directory_fd = open_or_raise(directory, O_RDONLY | O_DIRECTORY, 0)
        self.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.event_fd < 0:
            raise_os_error(directory)
        if index_init(&self.index, INITIAL_INDEX_CAPACITY) != 0:
            raise MemoryError("journal index")
        starts = []
        for name in os.listdir(directory):
            if name.endswith(SEGMENT_SUFFIX + ".tmp"):
                os.unlink(os.path.join(directory, name))  # a checkpoint a crash cut short
            elif (match := _SEGMENT_NAME.fullmatch(name)) is not None:
                starts.append(int(match.group(1)))
        starts.sort()
        for start in starts:
            self._remember_segment(start)
        self.next_seq = 1

    def __dealloc__(self):
        if self.serving:
            return  # a writer thread still runs with this memory: leak rather than crash
        self._release_descriptors()
        free(self.open_batch.records)
        free(self.submitted.records)
        free(self.writing.records)
        free(self.index.entries)
        free(self.segment_starts)
        pthread_mutex_destroy(&self.mutex)
        pthread_cond_destroy(&self.work_ready)

    def _release_descriptors(self):
        if self.segment_fd >= 0:
            close(self.segment_fd)
            self.segment_fd = -1
        if self.event_fd >= 0:
            close(self.event_fd)
            self.event_fd = -1
        if self.directory_fd >= 0:
            close(self.directory_fd)
            self.directory_fd = -1
        if self.lock_fd >= 0:
            close(self.lock_fd)
            self.lock_fd = -1

    cdef int _remember_segment_raw(self, uint64_t first_seq) noexcept nogil:
        cdef uint64_t* grown
        cdef Py_ssize_t capacity
        if self.segment_count > 0 and self.segment_starts[self.segment_count - 1] == first_seq:
            return 0  # rewritten in place: a checkpoint with no record since the last one
        if self.segment_count == self.segment_starts_capacity:
            capacity = max(2 * self.segment_starts_capacity, 16)
            grown = <uint64_t*>realloc(self.segment_starts, capacity * sizeof(uint64_t))
            if grown == NULL:
                return -1
            self.segment_starts = grown
            self.segment_starts_capacity = capacity
        self.segment_starts[self.segment_count] = first_seq
        self.segment_count += 1
        return 0

    def _segment_path(self, uint64_t first_seq) -> str:
        return os.path.join(self.directory, f"{first_seq:020d}{SEGMENT_SUFFIX}")

    def _remember_segment(self, uint64_t first_seq):
        if self._remember_segment_raw(first_seq) != 0:
            raise MemoryError("journal segment list")

    # --- before serving ----------------------------------------------------------

    def recover(self, uint64_t committed_seq, on_settled):
        """Fold every segment, oldest first, into the index of outstanding
        payments, and hand the settlements the payments record may not hold
        yet (sequence above committed_seq) to on_settled, in lists of
        (uuid16, processor, requested_at_ms, cents, generation, seq). A record
        that does not check out ends its segment: a crash tore it before it
        was acted on. Appending continues after the highest sequence seen."""
        if self.serving or self.recovered:
            raise RuntimeError("recover() runs once, before serve()")
        cdef JournalRecord chunk[READ_CHUNK_RECORDS]
        cdef SegmentHeader header
        cdef JournalRecord* record
        cdef Py_ssize_t got, count, i, segment
        cdef uint64_t highest = committed_seq
        cdef char name[SEGMENT_NAME_MAX]
        cdef int fd
        settled = []
        for segment in range(self.segment_count):
            segment_name(name, self.segment_starts[segment], False)
            fd = openat(self.directory_fd, name, O_RDONLY | O_CLOEXEC)
            if fd < 0:
                raise_os_error(self._segment_path(self.segment_starts[segment]))
            try:
                got = read_full(fd, <char*>&header, sizeof(SegmentHeader))
                if got < 0:
                    raise_os_error(self._segment_path(self.segment_starts[segment]))
                if (got != sizeof(SegmentHeader) or header.magic != SEGMENT_MAGIC
                        or header.version != JOURNAL_VERSION or header.record_size != sizeof(JournalRecord)
                        or header.first_seq != self.segment_starts[segment]):
                    raise ValueError(f"{self._segment_path(self.segment_starts[segment])} is not a paycore "
                                     f"journal segment (version {JOURNAL_VERSION})")
                highest = max(highest, header.first_seq - 1)
                while True:
                    got = read_full(fd, <char*>chunk, sizeof(chunk))
                    if got < 0:
                        raise_os_error(self._segment_path(self.segment_starts[segment]))
                    count = got // sizeof(JournalRecord)
                    for i in range(count):
                        record = &chunk[i]
                        if not record_is_valid(record):
                            count = -1
                            break
                        if index_apply(&self.index, record) != 0:
                            raise MemoryError("journal index")
                        highest = max(highest, record.seq)
                        if record.kind == SETTLED and record.seq > committed_seq:
                            settled.append((PyBytes_FromStringAndSize(<const char*>record.uuid, UUID_BYTES),
                                            record.processor, record.requested_at_ms, record.cents,
                                            record.generation, record.seq))
                            if len(settled) == RECOVERED_CHUNK:
                                on_settled(settled)
                                settled = []
                    if count < 0 or got < <Py_ssize_t>sizeof(chunk):
                        break
            finally:
                close(fd)
        if settled:
            on_settled(settled)
        self.next_seq = highest + 1
        self.recovered = True
        atomic_store(&self.durable_seq, highest)
        atomic_store(&self.committed_seq, committed_seq)
        atomic_store(&self.outstanding_count, self.index.count)

    def outstanding(self):
        """The payments the journal holds as accepted and neither settled nor
        discarded: (uuid16, cents, processor, requested_at_ms) where processor
        is -1 for a payment never sent. Before serve() or after it ended."""
        if self.serving:
            raise RuntimeError("the writer owns the index while it serves")
        cdef Py_ssize_t i
        cdef OutstandingEntry* entry
        payments = []
        for i in range(self.index.capacity):
            entry = &self.index.entries[i]
            if entry.occupied:
                payments.append((PyBytes_FromStringAndSize(<const char*>entry.uuid, UUID_BYTES), entry.cents,
                                 entry.processor if entry.flags & RECORD_SENT else -1,
                                 entry.requested_at_ms))
        return payments

    # --- the writer thread ---------------------------------------------------------

    def keep_pending_ids(self, AcceptedIds ids not None):
        """From serve() on, remember the id of every outstanding payment in
        `ids` again each time its epoch changes (ids must outlive serve())."""
        if self.serving:
            raise RuntimeError("keep_pending_ids() before serve()")
        self.pending_ids = ids
        self.pending_ids_epoch = ids.current_epoch()

    def serve(self):
        """The writer: run in a thread of its own until stop(). Starts a new
        segment with a checkpoint of the outstanding payments, then writes each
        submitted batch, retrying a failed write until it succeeds."""
        if not self.recovered:
            raise RuntimeError("recover() what the journal holds before serve()")
        with nogil:
            pthread_mutex_lock(&self.mutex)
            if self.served or self.here or self.closed:
                pthread_mutex_unlock(&self.mutex)
                with gil:
                    raise RuntimeError("the journal is already served, written here, or closed")
            self.served = self.serving = True
            pthread_mutex_unlock(&self.mutex)
            self.serve_raw()

    cdef void serve_raw(self) noexcept nogil:
        cdef bint stopping
        cdef timespec deadline
        while self.start_segment() != 0:
            self.notify_loop()
            if atomic_load_int(&self.closing):
                self.finish_serving()
                return
            pause_after_error()
        self.delete_committed_segments()
        pthread_mutex_lock(&self.mutex)
        while True:
            while self.submitted.count == 0 and not self.closing and not self.deletion_due:
                if self.pending_ids is None:
                    pthread_cond_wait(&self.work_ready, &self.mutex)
                    continue
                # Woken at least once a second: an epoch also begins by the clock.
                clock_gettime(CLOCK_REALTIME, &deadline)
                deadline.tv_sec += 1
                pthread_cond_timedwait(&self.work_ready, &self.mutex, &deadline)
                pthread_mutex_unlock(&self.mutex)
                self.remember_pending_ids()
                pthread_mutex_lock(&self.mutex)
            self.deletion_due = False
            if self.submitted.count == 0:
                if self.closing:
                    break
                pthread_mutex_unlock(&self.mutex)
                self.delete_committed_segments()
                pthread_mutex_lock(&self.mutex)
                continue
            stopping = self.closing
            self.writing, self.submitted = self.submitted, self.writing
            pthread_mutex_unlock(&self.mutex)
            # Before the batch is published: whoever sees it durable sees this done.
            self.remember_pending_ids()
            while self.write_batch(&self.writing) != 0:
                self.notify_loop()
                if stopping:
                    break  # never written, so never promised: nothing waits on it any more
                pause_after_error()
                stopping = atomic_load_int(&self.closing)
            self.writing.count = 0
            if self.segment_size >= self.segment_limit:
                while self.start_segment() != 0 and not atomic_load_int(&self.closing):
                    self.notify_loop()
                    pause_after_error()
            self.delete_committed_segments()
            pthread_mutex_lock(&self.mutex)
        pthread_mutex_unlock(&self.mutex)
        self.finish_serving()

    cdef void finish_serving(self) noexcept nogil:
        pthread_mutex_lock(&self.mutex)
        self.serving = False
        pthread_mutex_unlock(&self.mutex)
        self.notify_loop()

    cdef void notify_loop(self) noexcept nogil:
        cdef uint64_t one = 1
        if not self.here:  # written on the loop's thread: the loop knows
            write(self.event_fd, &one, sizeof(one))

    cdef int write_batch(self, RecordBuffer* batch) noexcept nogil:
        """Write, sync, fold into the index, publish; 0, or -1 with the file
        cut back to its whole records and write_errno set."""
        cdef Py_ssize_t size = batch.count * sizeof(JournalRecord)
        cdef Py_ssize_t i
        cdef int error
        if batch.count == 0:
            return 0
        # Written in place: a failed or torn write leaves records that do not
        # check out, and the next try writes over them.
        if (write_all(self.segment_fd, <const char*>batch.records, size, self.segment_size) != 0
                or (self.sync and fdatasync(self.segment_fd) != 0)):
            atomic_store_int(&self.write_errno, errno)
            return -1
        self.segment_size += size
        for i in range(batch.count):
            if index_apply(&self.index, &batch.records[i]) != 0:
                atomic_store_int(&self.write_errno, 12)  # ENOMEM: the checkpoint would miss it
        atomic_store(&self.outstanding_count, self.index.count)
        atomic_store(&self.batches_written, self.batches_written + 1)
        atomic_store(&self.records_written, self.records_written + batch.count)
        atomic_store_int(&self.write_errno, 0)
        atomic_store(&self.durable_seq, batch.records[batch.count - 1].seq)
        self.notify_loop()
        return 0

    cdef int start_segment(self) noexcept nogil:
        """A new segment holding the header and a checkpoint of the outstanding
        payments, written aside and renamed into place once complete, so the
        segments before it may go once their settlements are committed."""
        cdef uint64_t first_seq = atomic_load(&self.durable_seq) + 1
        cdef char temporary[SEGMENT_NAME_MAX]
        cdef char final[SEGMENT_NAME_MAX]
        cdef SegmentHeader header
        cdef int64_t size = sizeof(SegmentHeader)
        cdef int fd, error
        segment_name(temporary, first_seq, True)
        segment_name(final, first_seq, False)
        fd = openat(self.directory_fd, temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, FILE_MODE)
        if fd < 0:
            atomic_store_int(&self.write_errno, errno)
            return -1
        memset(&header, 0, sizeof(SegmentHeader))
        header.magic = SEGMENT_MAGIC
        header.version = JOURNAL_VERSION
        header.record_size = sizeof(JournalRecord)
        header.first_seq = first_seq
        # Allocated up front: an fdatasync then flushes data only, not the
        # file's growing size and extents (a quarter of the time on ext4).
        error = posix_fallocate(fd, 0, self.segment_limit)
        if error == 0:
            error = self.write_checkpoint(fd, &header, &size)
        if error == 0 and ((self.sync and fdatasync(fd) != 0)
                           or renameat(self.directory_fd, temporary, self.directory_fd, final) != 0
                           or (self.sync and fsync(self.directory_fd) != 0)):
            error = errno
        if error == 0 and self._remember_segment_raw(first_seq) != 0:
            error = 12  # ENOMEM
        if error != 0:
            atomic_store_int(&self.write_errno, error)
            close(fd)
            unlinkat(self.directory_fd, temporary, 0)
            return -1
        if self.segment_fd >= 0:
            close(self.segment_fd)
        self.segment_fd = fd
        self.segment_size = size
        return 0

    cdef int write_checkpoint(self, int fd, const SegmentHeader* header, int64_t* size) noexcept nogil:
        """The header, then one OUTSTANDING record per payment in the index;
        0, or the errno of the failed write. size: bytes written."""
        cdef JournalRecord chunk[CHECKPOINT_CHUNK_RECORDS]
        cdef OutstandingEntry* entry
        cdef Py_ssize_t i, filled = 0
        if write_all(fd, <const char*>header, sizeof(SegmentHeader), 0) != 0:
            return errno
        for i in range(self.index.capacity):
            entry = &self.index.entries[i]
            if entry.occupied:
                fill_record(&chunk[filled], OUTSTANDING, 0, entry.uuid, entry.processor, entry.flags,
                            entry.cents, entry.requested_at_ms, 0)
                filled += 1
            if filled == CHECKPOINT_CHUNK_RECORDS or (filled > 0 and i == self.index.capacity - 1):
                if write_all(fd, <const char*>chunk, filled * sizeof(JournalRecord), size[0]) != 0:
                    return errno
                size[0] += filled * sizeof(JournalRecord)
                filled = 0
        return 0

    cdef void remember_pending_ids(self) noexcept nogil:
        cdef int64_t epoch
        cdef Py_ssize_t i
        cdef OutstandingEntry* entry
        if self.pending_ids is None:
            return
        epoch = self.pending_ids.current_epoch()
        if epoch == self.pending_ids_epoch:
            return
        self.pending_ids_epoch = epoch
        for i in range(self.index.capacity):
            entry = &self.index.entries[i]
            if entry.occupied:
                self.pending_ids.remember_raw(entry.uuid, entry.cents)

    cdef void delete_committed_segments(self) noexcept nogil:
        """Every segment but the newest whose appended records the payments
        record has committed: what it held outstanding is in a later checkpoint."""
        cdef uint64_t committed = atomic_load(&self.committed_seq)
        cdef char name[SEGMENT_NAME_MAX]
        cdef Py_ssize_t deleted = 0
        while deleted + 1 < self.segment_count and self.segment_starts[deleted + 1] - 1 <= committed:
            segment_name(name, self.segment_starts[deleted], False)
            if unlinkat(self.directory_fd, name, 0) != 0 and errno != ENOENT:
                break
            deleted += 1
        if deleted:
            self.segment_count -= deleted
            memcpy(self.segment_starts, &self.segment_starts[deleted], self.segment_count * sizeof(uint64_t))
            self.notify_loop()

    # --- written on the caller's thread ------------------------------------------------

    @property
    def in_memory(self) -> bool:
        """The directory is on tmpfs or ramfs: a write is a copy that never
        waits for a device, cheaper than handing it to a thread."""
        return on_memory_filesystem(self.directory_fd, self.directory)

    def open_here(self):
        """Write on the caller's thread from now on, instead of serve():
        starts a new segment with a checkpoint of the outstanding payments."""
        cdef int result
        if not self.recovered:
            raise RuntimeError("recover() what the journal holds before open_here()")
        if self.served or self.here or self.closed:
            raise RuntimeError("the journal is already served, written here, or closed")
        with nogil:
            result = self.start_segment()
        if result != 0:
            raise OSError(self.write_errno, os.strerror(self.write_errno), self.directory)
        self.here = True
        self.maintain()

    def write_here(self) -> bool:
        """Write (and, with sync, sync) what was appended since the last write.
        False: the write failed (`error` has its errno) and the records stay
        appended, to be written with the next call."""
        cdef int result = 0
        if not self.here:
            raise RuntimeError("write_here() after open_here()")
        if self.open_batch.count == 0:
            return True
        with nogil:
            # Before the batch is published, as the writer thread does.
            self.remember_pending_ids()
            result = self.write_batch(&self.open_batch)
            if result == 0:
                self.open_batch.count = 0
                # A new segment that fails is tried again after the next write.
                if self.segment_size >= self.segment_limit:
                    self.start_segment()
                self.delete_committed_segments()
        return result == 0

    def maintain(self):
        """What the writer thread does by the clock, for a journal written here:
        remember the pending ids again at a new epoch, delete the segments the
        payments record holds."""
        if not self.here:
            raise RuntimeError("maintain() after open_here()")
        with nogil:
            self.remember_pending_ids()
            self.delete_committed_segments()

    # --- the event loop's side ---------------------------------------------------------

    cdef uint64_t append(self, RecordKind kind, const unsigned char* uuid16, int processor, int64_t cents,
                         int64_t requested_at_ms, uint32_t generation) except 0:
        if buffer_reserve(&self.open_batch, self.open_batch.count + 1) != 0:
            raise MemoryError("journal batch")
        cdef uint64_t seq = self.next_seq
        fill_record(&self.open_batch.records[self.open_batch.count], kind, seq, uuid16, processor, 0,
                    cents, requested_at_ms, generation)
        self.open_batch.count += 1
        self.next_seq += 1
        return seq

    def accepted(self, bytes uuid16 not None, int64_t cents) -> int:
        """A payment this instance promised to process."""
        return self.append(ACCEPTED, checked_uuid(uuid16), 0, cents, 0, 0)

    def sending(self, bytes uuid16 not None, int processor, int64_t requested_at_ms) -> int:
        """A payment about to be sent to `processor` with this requestedAt."""
        return self.append(SENDING, checked_uuid(uuid16), checked_processor(processor), 0, requested_at_ms, 0)

    def settled(self, bytes uuid16 not None, int processor, int64_t requested_at_ms, int64_t cents,
                uint64_t generation) -> int:
        """A payment `processor` holds, with the requestedAt it holds, counted
        in the ledger's purge generation."""
        return self.append(SETTLED, checked_uuid(uuid16), checked_processor(processor), cents, requested_at_ms,
                           checked_generation(generation))

    def discarded(self, bytes uuid16 not None) -> int:
        """A payment no longer this instance's to deliver."""
        return self.append(DISCARDED, checked_uuid(uuid16), 0, 0, 0, 0)

    def submit(self) -> int:
        """Hand what was appended to the writer; the number of records handed."""
        cdef Py_ssize_t count = self.open_batch.count
        cdef int taken
        if self.here:
            raise RuntimeError("a journal written here has no writer to submit to: write_here()")
        if count == 0:
            return 0
        with nogil:
            pthread_mutex_lock(&self.mutex)
            taken = buffer_take(&self.submitted, &self.open_batch)
            unlock_and_wake(&self.mutex, &self.work_ready)
        if taken != 0:
            raise MemoryError("journal batch")
        return count

    def wait_durable(self, uint64_t seq, int64_t budget_ns) -> bool:
        """Spin, without the GIL, until the writer has made seq durable or
        budget_ns has passed: cheaper than a round trip through the event
        loop when the write takes a few microseconds."""
        cdef timespec now
        cdef int64_t deadline, spins = 0
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &now)
            deadline = now.tv_sec * 1000000000 + now.tv_nsec + budget_ns
            while atomic_load(&self.durable_seq) < seq:
                cpu_relax()
                spins += 1
                if spins % 64 == 0:
                    clock_gettime(CLOCK_MONOTONIC, &now)
                    if now.tv_sec * 1000000000 + now.tv_nsec >= deadline:
                        break
        return atomic_load(&self.durable_seq) >= seq

    def drain_event(self) -> None:
        """Reset event_fd once its readiness was seen."""
        cdef uint64_t counter
        read(self.event_fd, &counter, sizeof(counter))

    @property
    def event_fd(self) -> int:
        return self.event_fd

    @property
    def appended_seq(self) -> int:
        """The sequence number of the last record appended."""
        return self.next_seq - 1

    @property
    def durable_seq(self) -> int:
        """Every record up to this sequence number is written (and synced)."""
        return atomic_load(&self.durable_seq)

    @property
    def committed_seq(self) -> int:
        return atomic_load(&self.committed_seq)

    @committed_seq.setter
    def committed_seq(self, uint64_t value):
        """The payments record holds every settlement up to this sequence
        number: segments holding nothing later may be deleted."""
        if value > atomic_load(&self.committed_seq):
            atomic_store(&self.committed_seq, value)
            if self.here:
                with nogil:
                    self.delete_committed_segments()
                return
            with nogil:
                raise_and_wake(&self.mutex, &self.work_ready, &self.deletion_due)

    @property
    def error(self) -> int:
        """errno of the writer's last failed write, 0 after a success."""
        return atomic_load_int(&self.write_errno)

    @property
    def batches_written(self) -> int:
        return atomic_load(&self.batches_written)

    @property
    def records_written(self) -> int:
        return atomic_load(&self.records_written)

    @property
    def outstanding_count(self) -> int:
        """Payments accepted and neither settled nor discarded, as written."""
        return atomic_load(&self.outstanding_count)

    @property
    def segments(self) -> int:
        return self.segment_count

    @property
    def serving(self) -> bool:
        return self.serving

    def stop(self) -> None:
        """Ask the writer to write what was submitted and return from serve().
        Before serve() begins (its thread not yet running), serve() will then
        write what was submitted and return at once."""
        with nogil:
            raise_and_wake(&self.mutex, &self.work_ready, &self.closing)

    def close(self) -> None:
        """Release the files once serve() has returned (or never ran);
        records not submitted are dropped."""
        if self.serving:
            raise RuntimeError("the writer still runs: stop() it and wait for serve() to return")
        self.closed = True
        self._release_descriptors()
        self.open_batch.count = 0
