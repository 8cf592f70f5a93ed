"""The correlationIds accepted by any service instance on this host.

A file mapped MAP_SHARED by every instance holds an open-addressing hash table
with linear probing. Each slot's tag carries its state and the generation it
was written in; purge() bumps the generation, which frees every older slot at
once. A slot is claimed by compare-and-swap on its tag (free -> WRITING), then
filled, then published (WRITING -> READY, release ordering), so no lock is
ever held and a killed process cannot block the others.
"""
import os

from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_CLOEXEC, O_CREAT, O_RDWR, open as open_file
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, ftruncate, pread, pwrite

from paycore.core.correlation_id cimport UUID_BYTES


cdef extern from "<sys/file.h>" nogil:
    enum: LOCK_EX
    enum: LOCK_UN
    int flock(int fd, int operation)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from * nogil:
    enum:
        ATOMIC_RELAXED "__ATOMIC_RELAXED"
        ATOMIC_ACQUIRE "__ATOMIC_ACQUIRE"
        ATOMIC_RELEASE "__ATOMIC_RELEASE"
        ATOMIC_SEQ_CST "__ATOMIC_SEQ_CST"
    uint64_t atomic_load "__atomic_load_n"(const uint64_t* address, int order)
    void atomic_store "__atomic_store_n"(uint64_t* address, uint64_t value, int order)
    uint64_t atomic_increment "__atomic_add_fetch"(uint64_t* address, uint64_t delta, int order)
    bint atomic_compare_exchange "__atomic_compare_exchange_n"(
        uint64_t* address, uint64_t* expected, uint64_t desired, bint weak,
        int success_order, int failure_order)
    int64_t atomic_load_signed "__atomic_load_n"(const int64_t* address, int order)
    void atomic_store_signed "__atomic_store_n"(int64_t* address, int64_t value, int order)
    int64_t atomic_add_signed "__atomic_add_fetch"(int64_t* address, int64_t delta, int order)


CLAIMED = ID_CLAIMED
DUPLICATE = ID_DUPLICATE
CONFLICT = ID_CONFLICT
FULL = ID_FULL

DEFAULT_SLOTS = 1 << 19

cdef uint64_t MAGIC = 0x5445534449594150  # "PAYIDSET" in the file on little-endian hosts
cdef uint64_t FORMAT_VERSION = 1
cdef uint64_t MAX_SLOTS = 1ULL << 32

cdef enum SlotState:
    EMPTY = 0
    WRITING = 1
    READY = 2
    TOMBSTONE = 3

cdef enum:
    STATE_BITS = 2
    STATE_MASK = 3
    # Busy-wait this many reads before yielding the CPU to a writer mid-insert.
    BUSY_SPINS = 64

# A writer fills a slot in a few nanoseconds; one that has not finished after
# this long was killed (or stalled far beyond any request's budget).
cdef int64_t STALE_WRITER_NS = 50 * 1000 * 1000


cdef inline uint64_t make_tag(uint64_t generation, SlotState state) noexcept nogil:
    return (generation << STATE_BITS) | state


cdef inline SlotState tag_state(uint64_t tag) noexcept nogil:
    return <SlotState>(tag & STATE_MASK)


cdef inline uint64_t tag_generation(uint64_t tag) noexcept nogil:
    return tag >> STATE_BITS


cdef inline bint is_free(uint64_t tag, uint64_t generation) noexcept nogil:
    return tag_state(tag) == EMPTY or tag_generation(tag) < generation


cdef inline void split_key(const unsigned char* uuid16, uint64_t* key_high,
                           uint64_t* key_low) noexcept nogil:
    memcpy(key_high, uuid16, 8)
    memcpy(key_low, uuid16 + 8, 8)


cdef inline uint64_t key_hash(uint64_t key_high, uint64_t key_low) noexcept nogil:
    # UUIDs are random apart from their version and variant bits, but the
    # ids come from clients: the murmur3 finaliser spreads any pattern.
    cdef uint64_t mixed = key_high ^ (key_low * 0x9E3779B97F4A7C15ULL)
    mixed ^= mixed >> 33
    mixed *= 0xFF51AFD7ED558CCDULL
    mixed ^= mixed >> 33
    mixed *= 0xC4CEB9FE1A85EC53ULL
    mixed ^= mixed >> 33
    return mixed


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


cdef inline size_t file_bytes(uint64_t slot_count) noexcept nogil:
    return sizeof(SharedHeader) + slot_count * sizeof(Slot)


cdef class AcceptedIds:
    """The accepted correlationIds of every instance, in a shared file at path.

    slots is rounded up to a power of two; claims are refused (FULL) once three
    quarters of them are used, which keeps every probe short.
    """

    def __cinit__(self, path, Py_ssize_t slots=DEFAULT_SLOTS):
        self.header = NULL
        if slots < 1 or <uint64_t>slots > MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {MAX_SLOTS}, got {slots}")
        cdef uint64_t slot_count = 1
        while slot_count < <uint64_t>slots:
            slot_count <<= 1
        cdef bytes encoded_path = os.fsencode(path)
        cdef void* address = NULL
        cdef int fd = open_file(encoded_path, O_RDWR | O_CREAT | O_CLOEXEC, 0o666)
        if fd < 0:
            raise_os_error(path)
        try:
            # A second instance starting at the same moment waits here until
            # the file is initialised.
            if flock(fd, LOCK_EX) != 0:
                raise_os_error(path)
            prepare_file(fd, path, slot_count)
            address = mmap(NULL, file_bytes(slot_count), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if address == MAP_FAILED:
                raise_os_error(path)
        finally:
            # Explicitly: the mapping keeps the open file, and so the lock, alive after close.
            flock(fd, LOCK_UN)
            close(fd)
        self.header = <SharedHeader*>address
        self.table = <Slot*>(<char*>address + sizeof(SharedHeader))
        self.mapped_bytes = file_bytes(slot_count)
        self.slot_mask = slot_count - 1
        self.occupancy_limit = <int64_t>(slot_count * 3 // 4)

    def __dealloc__(self):
        if self.header != NULL:
            munmap(self.header, self.mapped_bytes)

    cdef ClaimResult claim_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil:
        cdef uint64_t key_high, key_low, generation, tag, writing
        cdef Slot* slot
        split_key(uuid16, &key_high, &key_low)
        while True:
            generation = atomic_load(&self.header.generation, ATOMIC_ACQUIRE)
            slot = probe(self, key_high, key_low, generation, &tag)
            if slot == NULL:
                return ID_FULL
            if tag_generation(tag) > generation:
                continue
            if not is_free(tag, generation):
                if atomic_load_signed(&slot.cents, ATOMIC_RELAXED) == cents:
                    return ID_DUPLICATE
                return ID_CONFLICT
            if (atomic_load_signed(&self.header.live_count, ATOMIC_RELAXED)
                    + atomic_load_signed(&self.header.retired_count, ATOMIC_RELAXED)
                    >= self.occupancy_limit):
                return ID_FULL
            writing = make_tag(generation, WRITING)
            if not atomic_compare_exchange(&slot.tag, &tag, writing, False,
                                           ATOMIC_ACQUIRE, ATOMIC_ACQUIRE):
                continue  # another process took the slot first, maybe for this very key
            atomic_store(&slot.key_high, key_high, ATOMIC_RELAXED)
            atomic_store(&slot.key_low, key_low, ATOMIC_RELAXED)
            atomic_store_signed(&slot.cents, cents, ATOMIC_RELAXED)
            if atomic_compare_exchange(&slot.tag, &writing, make_tag(generation, READY), False,
                                       ATOMIC_RELEASE, ATOMIC_RELAXED):
                atomic_add_signed(&self.header.live_count, 1, ATOMIC_RELAXED)
                return ID_CLAIMED
            # Stalled past STALE_WRITER_NS, the slot was retired under us: claim afresh.

    cdef bint release_raw(self, const unsigned char* uuid16) noexcept nogil:
        cdef uint64_t generation, ready
        cdef Slot* slot = find(self, uuid16, &generation)
        if slot == NULL:
            return False
        ready = make_tag(generation, READY)
        # A tombstone, never a free slot: a free one could be claimed for a key
        # that another process is inserting further along the same probe path.
        if not atomic_compare_exchange(&slot.tag, &ready, make_tag(generation, TOMBSTONE), False,
                                       ATOMIC_ACQUIRE, ATOMIC_ACQUIRE):
            return False
        atomic_add_signed(&self.header.live_count, -1, ATOMIC_RELAXED)
        atomic_add_signed(&self.header.retired_count, 1, ATOMIC_RELAXED)
        return True

    cdef bint contains_raw(self, const unsigned char* uuid16) noexcept nogil:
        cdef uint64_t generation
        return find(self, uuid16, &generation) != NULL

    def claim(self, bytes uuid16 not None, int64_t cents) -> int:
        """Accept the payment unless its id is known: CLAIMED, DUPLICATE,
        CONFLICT (known with another amount) or FULL."""
        return self.claim_raw(checked_key(self, uuid16), cents)

    def release(self, bytes uuid16 not None) -> bool:
        """Forget a claimed id whose payment could not be enqueued after all."""
        return self.release_raw(checked_key(self, uuid16))

    def contains(self, bytes uuid16 not None) -> bool:
        return self.contains_raw(checked_key(self, uuid16))

    def purge(self) -> None:
        """Forget every id, for every instance at once."""
        if self.header == NULL:
            raise ValueError("AcceptedIds is closed")
        atomic_increment(&self.header.generation, 1, ATOMIC_SEQ_CST)
        atomic_store_signed(&self.header.live_count, 0, ATOMIC_RELAXED)
        atomic_store_signed(&self.header.retired_count, 0, ATOMIC_RELAXED)

    def close(self) -> None:
        if self.header != NULL:
            munmap(self.header, self.mapped_bytes)
            self.header = NULL
            self.table = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        if self.header == NULL:
            raise ValueError("AcceptedIds is closed")
        # A claim finishing across a purge can leave the count slightly off.
        return max(atomic_load_signed(&self.header.live_count, ATOMIC_RELAXED), 0)

    @property
    def slots(self) -> int:
        return self.slot_mask + 1


cdef uint64_t settled_tag(SharedHeader* header, Slot* slot, uint64_t generation) noexcept nogil:
    """The slot's tag once no writer is mid-insert there. A writer that does
    not finish within STALE_WRITER_NS is presumed dead: its slot is retired
    as a tombstone, so nobody waits for it again. Should that writer still be
    alive, its publishing compare-and-swap fails and it claims afresh, which
    keeps each key claimed once."""
    cdef uint64_t tag = atomic_load(&slot.tag, ATOMIC_ACQUIRE)
    cdef uint64_t watched = tag
    cdef int spins = 0
    cdef int64_t deadline = 0
    cdef int64_t now
    while tag_state(tag) == WRITING:
        if tag != watched:
            watched = tag
            spins = 0
            deadline = 0
        if spins < BUSY_SPINS:
            spins += 1
        else:
            now = monotonic_ns()
            if deadline == 0:
                deadline = now + STALE_WRITER_NS
            elif now >= deadline:
                if atomic_compare_exchange(&slot.tag, &tag, make_tag(generation, TOMBSTONE),
                                           False, ATOMIC_ACQUIRE, ATOMIC_ACQUIRE):
                    atomic_add_signed(&header.retired_count, 1, ATOMIC_RELAXED)
                    return make_tag(generation, TOMBSTONE)
                continue  # the writer finished meanwhile: tag holds its new value
            sched_yield()
        tag = atomic_load(&slot.tag, ATOMIC_ACQUIRE)
    return tag


cdef Slot* probe(AcceptedIds ids, uint64_t key_high, uint64_t key_low, uint64_t generation,
                 uint64_t* tag_out) noexcept nogil:
    """The first slot along the key's probe sequence that is free, holds the
    key in this generation, or was written in a newer generation (a purge
    began meanwhile); NULL if the whole table holds none."""
    cdef uint64_t index = key_hash(key_high, key_low) & ids.slot_mask
    cdef uint64_t probes
    cdef uint64_t tag
    cdef Slot* slot
    for probes in range(ids.slot_mask + 1):
        slot = &ids.table[index]
        tag = settled_tag(ids.header, slot, generation)
        if (is_free(tag, generation)
                or tag_generation(tag) > generation
                or (tag_state(tag) == READY
                    and atomic_load(&slot.key_high, ATOMIC_RELAXED) == key_high
                    and atomic_load(&slot.key_low, ATOMIC_RELAXED) == key_low)):
            tag_out[0] = tag
            return slot
        index = (index + 1) & ids.slot_mask
    return NULL


cdef Slot* find(AcceptedIds ids, const unsigned char* uuid16, uint64_t* generation_out) noexcept nogil:
    """The slot holding the key in the current generation, or NULL."""
    cdef uint64_t key_high, key_low, generation, tag
    cdef Slot* slot
    split_key(uuid16, &key_high, &key_low)
    while True:
        generation = atomic_load(&ids.header.generation, ATOMIC_ACQUIRE)
        slot = probe(ids, key_high, key_low, generation, &tag)
        if slot != NULL and tag_generation(tag) > generation:
            continue
        generation_out[0] = generation
        if slot == NULL or is_free(tag, generation):
            return NULL
        return slot


cdef const unsigned char* checked_key(AcceptedIds ids, bytes uuid16) except NULL:
    if ids.header == NULL:
        raise ValueError("AcceptedIds is closed")
    if len(uuid16) != UUID_BYTES:
        raise ValueError(f"a UUID is {UUID_BYTES} bytes, got {len(uuid16)}")
    return uuid16


cdef prepare_file(int fd, path, uint64_t slot_count):
    """Under the file lock: initialise a file that holds no table yet, or
    check that the existing table is one of ours with slot_count slots."""
    cdef SharedHeader header
    cdef struct_stat status
    cdef size_t expected_bytes = file_bytes(slot_count)
    memset(&header, 0, sizeof(header))
    cdef Py_ssize_t header_bytes = pread(fd, &header, sizeof(header), 0)
    if header_bytes < 0 or fstat(fd, &status) != 0:
        raise_os_error(path)
    if is_all_zero(&header, sizeof(header)):
        # New, or its creator died before writing the header: nothing to keep.
        header.magic = MAGIC
        header.version = FORMAT_VERSION
        header.slot_count = slot_count
        if (ftruncate(fd, 0) != 0 or ftruncate(fd, expected_bytes) != 0
                or pwrite(fd, &header, sizeof(header), 0) != sizeof(header)):
            raise_os_error(path)
        return
    if <size_t>header_bytes < sizeof(header) or header.magic != MAGIC:
        raise ValueError(f"{path!r} is not an accepted-ids file")
    if header.version != FORMAT_VERSION:
        raise ValueError(f"{path!r} has format version {header.version}, "
                         f"this build reads version {FORMAT_VERSION}")
    if header.slot_count != slot_count:
        raise ValueError(f"{path!r} holds {header.slot_count} slots, not {slot_count}: "
                         f"remove the file to change the size")
    if <size_t>status.st_size != expected_bytes:
        raise ValueError(f"{path!r} is {status.st_size} bytes, "
                         f"a table of {slot_count} slots takes {expected_bytes}")


cdef bint is_all_zero(const void* data, size_t length) noexcept nogil:
    cdef const unsigned char* data_bytes = <const unsigned char*>data
    cdef size_t i
    for i in range(length):
        if data_bytes[i] != 0:
            return False
    return True


cdef int raise_os_error(path) except -1:
    cdef int error = errno
    raise OSError(error, os.strerror(error), path)
