"""The instance journal: fixed-size checksummed records, appended in batches."""
import os

from libc.errno cimport EAGAIN, EINTR, ENOENT, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_APPEND, O_CLOEXEC, O_CREAT, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY
from posix.fcntl cimport open as open_file
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, fsync, ftruncate, pread, read, write

from cpython.bytes cimport PyBytes_FromStringAndSize

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.posix_files cimport open_or_raise, raise_os_error


cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int operation)
    enum: LOCK_EX
    enum: LOCK_NB


cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)


cdef enum:
    FILE_MODE = 0o644
    JOURNAL_VERSION = 1
    READ_CHUNK_RECORDS = 4096
    INITIAL_BUFFER_RECORDS = 256

cdef uint64_t JOURNAL_MAGIC = 0x4c4e524a59415000ULL  # "\0PAYJRNL"

assert sizeof(JournalRecord) == 48


cdef uint32_t record_checksum(const JournalRecord* record) noexcept nogil:
    cdef const uint8_t* data = <const uint8_t*>record
    cdef uint32_t hash = 2166136261U
    cdef size_t i
    for i in range(sizeof(uint32_t), sizeof(JournalRecord)):
        hash = (hash ^ data[i]) * 16777619U
    return hash


cdef void fill_record(JournalRecord* record, RecordKind kind, const unsigned char* uuid16, int processor,
                      int64_t cents, int64_t requested_at_ms, uint64_t generation) noexcept nogil:
    memset(record, 0, sizeof(JournalRecord))
    record.kind = kind
    record.processor = processor
    record.generation = generation
    memcpy(record.uuid, uuid16, UUID_BYTES)
    record.cents = cents
    record.requested_at_ms = requested_at_ms
    record.checksum = record_checksum(record)


cdef bint record_is_valid(const JournalRecord* record) noexcept nogil:
    return (record.checksum == record_checksum(record)
            and ACCEPTED <= record.kind <= SETTLED and record.processor <= 1)


cdef void fill_header(FileHeader* header) noexcept nogil:
    header.magic = JOURNAL_MAGIC
    header.version = JOURNAL_VERSION
    header.record_size = sizeof(JournalRecord)


cdef int write_all(int fd, const char* data, Py_ssize_t size) noexcept nogil:
    """0, or -1 with errno set; a short write is continued, EINTR retried."""
    cdef Py_ssize_t written
    while size > 0:
        written = write(fd, data, size)
        if written < 0:
            if errno == EINTR:
                continue
            return -1
        data += written
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


cdef int check_header(const FileHeader* header, Py_ssize_t size, str path) except -1:
    if (size != sizeof(FileHeader) or header.magic != JOURNAL_MAGIC
            or header.version != JOURNAL_VERSION or header.record_size != sizeof(JournalRecord)):
        raise ValueError(f"{path} is not a paycore journal (version {JOURNAL_VERSION})")
    return 0


cdef tuple record_tuple(const JournalRecord* record):
    return (record.kind, PyBytes_FromStringAndSize(<const char*>record.uuid, UUID_BYTES),
            record.processor, record.cents, record.requested_at_ms, record.generation)


cdef const unsigned char* checked_uuid(bytes uuid16) except NULL:
    if len(uuid16) != UUID_BYTES:
        raise ValueError(f"a UUID is {UUID_BYTES} bytes, got {len(uuid16)}")
    return uuid16


cdef int checked_processor(int processor) except -1:
    if processor != 0 and processor != 1:
        raise ValueError(f"processor must be 0 (default) or 1 (fallback), not {processor}")
    return processor


def read_journal(str path):
    """Every record of the journal at `path`, oldest first, as (kind, uuid16,
    processor, cents, requested_at_ms, generation); none if there is no file.
    Reading stops at the first record that does not check out: the tail a
    crash tore."""
    cdef int fd = open_file(os.fsencode(path), O_RDONLY | O_CLOEXEC)
    if fd < 0:
        if errno == ENOENT:
            return []
        raise_os_error(path)
    cdef FileHeader header
    cdef JournalRecord chunk[READ_CHUNK_RECORDS]
    cdef Py_ssize_t got, count, i
    records = []
    try:
        got = read_full(fd, <char*>&header, sizeof(FileHeader))
        if got < 0:
            raise_os_error(path)
        if got == 0:
            return records
        check_header(&header, got, path)
        while True:
            got = read_full(fd, <char*>chunk, sizeof(chunk))
            if got < 0:
                raise_os_error(path)
            count = got // sizeof(JournalRecord)
            for i in range(count):
                if not record_is_valid(&chunk[i]):
                    return records
                records.append(record_tuple(&chunk[i]))
            if got < <Py_ssize_t>sizeof(chunk):
                return records
    finally:
        close(fd)


def write_journal(str path, records, bint sync=False):
    """Replace the journal at `path` with `records` (tuples as read_journal
    gives them) in one atomic rename: a compacted journal."""
    cdef str temporary = path + ".new"
    cdef Journal writer = Journal.__new__(Journal)
    writer.path = temporary
    writer.sync = sync
    writer.fd = open_or_raise(temporary, O_WRONLY | O_CREAT | O_TRUNC, FILE_MODE)
    try:
        writer.start_file()
        for kind, uuid16, processor, cents, requested_at_ms, generation in records:
            if not ACCEPTED <= kind <= SETTLED:
                raise ValueError(f"unknown journal record kind {kind}")
            writer.append(kind, checked_uuid(uuid16), checked_processor(processor),
                          cents, requested_at_ms, generation)
        writer.flush()
    except BaseException:
        writer.close()
        os.unlink(temporary)
        raise
    writer.close()
    os.rename(temporary, path)
    if sync:
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


cdef class Journal:
    """Appends records to an in-memory batch; flush() writes the batch with one
    write (then fdatasync when `sync`): group commit. The file is held with an
    exclusive lock so two processes never interleave records in it."""

    def __cinit__(self):
        self.fd = -1

    def __init__(self, str path, bint sync=False):
        self.path = path
        self.sync = sync
        self.fd = open_or_raise(path, O_RDWR | O_APPEND | O_CREAT, FILE_MODE)
        if flock(self.fd, LOCK_EX | LOCK_NB) != 0:
            if errno == EAGAIN:
                self.close()
                raise RuntimeError(f"the journal {path} is open in another process")
            raise_os_error(path)
        cdef struct_stat status
        if fstat(self.fd, &status) != 0:
            raise_os_error(path)
        if status.st_size == 0:
            self.start_file()
            return
        cdef FileHeader header
        cdef Py_ssize_t got = pread(self.fd, &header, sizeof(FileHeader), 0)
        if got < 0:
            raise_os_error(path)
        check_header(&header, got, path)
        # Only whole records: a write cut short by a crash must not shift the next ones.
        self.durable_size = sizeof(FileHeader) + (
            (status.st_size - sizeof(FileHeader)) // sizeof(JournalRecord) * sizeof(JournalRecord))
        if self.durable_size != status.st_size and ftruncate(self.fd, self.durable_size) != 0:
            raise_os_error(path)

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        free(self.buffer)

    cdef int start_file(self) except -1:
        cdef FileHeader header
        fill_header(&header)
        if write_all(self.fd, <const char*>&header, sizeof(FileHeader)) != 0:
            raise_os_error(self.path)
        self.durable_size = sizeof(FileHeader)
        return 0

    cdef int append(self, RecordKind kind, const unsigned char* uuid16, int processor,
                    int64_t cents, int64_t requested_at_ms, uint64_t generation) except -1:
        cdef Py_ssize_t capacity
        cdef JournalRecord* grown
        if self.buffered == self.buffer_capacity:
            capacity = max(2 * self.buffer_capacity, <Py_ssize_t>INITIAL_BUFFER_RECORDS)
            grown = <JournalRecord*>realloc(self.buffer, capacity * sizeof(JournalRecord))
            if grown == NULL:
                raise MemoryError("journal batch")
            self.buffer = grown
            self.buffer_capacity = capacity
        fill_record(&self.buffer[self.buffered], kind, uuid16, processor, cents, requested_at_ms, generation)
        self.buffered += 1
        return 0

    def accepted(self, bytes uuid16 not None, int64_t cents, uint64_t generation) -> None:
        """A payment this instance promised to process."""
        self.append(ACCEPTED, checked_uuid(uuid16), 0, cents, 0, generation)

    def sending(self, bytes uuid16 not None, int processor, int64_t requested_at_ms,
                uint64_t generation) -> None:
        """A payment about to be sent to `processor` with this requestedAt."""
        self.append(SENDING, checked_uuid(uuid16), checked_processor(processor), 0,
                    requested_at_ms, generation)

    def settled(self, bytes uuid16 not None, int processor, int64_t requested_at_ms, int64_t cents,
                uint64_t generation) -> None:
        """A payment `processor` holds, with the requestedAt it holds."""
        self.append(SETTLED, checked_uuid(uuid16), checked_processor(processor), cents,
                    requested_at_ms, generation)

    @property
    def pending(self) -> int:
        """Records appended and not yet written."""
        return self.buffered

    @property
    def size(self) -> int:
        """Bytes in the file."""
        return self.durable_size

    def flush(self) -> int:
        """Write the batch; the number of records written. On an error the
        batch is kept for the next try and the file keeps only whole records."""
        cdef Py_ssize_t count = self.buffered
        cdef Py_ssize_t size = count * sizeof(JournalRecord)
        if count == 0:
            return 0
        if self.fd < 0:
            raise ValueError(f"the journal {self.path} is closed")
        if write_all(self.fd, <const char*>self.buffer, size) != 0 or (self.sync and fdatasync(self.fd) != 0):
            error = OSError(errno, os.strerror(errno), self.path)
            ftruncate(self.fd, self.durable_size)
            raise error
        self.durable_size += size
        self.buffered = 0
        return count

    def close(self) -> None:
        """Close the file; records not flushed are dropped."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        self.buffered = 0

