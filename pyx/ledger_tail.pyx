"""The settlements the payments record has not committed yet, per instance,
in shared memory that every instance of the host reads (see the .pxd)."""
import os

from libc.errno cimport EACCES, EAGAIN, ENOENT, errno
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport F_UNLCK, F_WRLCK, O_CREAT, O_RDONLY, O_RDWR
from posix.mman cimport MAP_FAILED, MAP_POPULATE, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, ftruncate

from paycore.core.instance_registry cimport check_instance_name, register_instance, slot_name
from paycore.core.posix_files cimport lock_file, open_or_raise, raise_os_error
from paycore.core.processor_sums cimport ProcessorSums, add_payments, sums_tuple


cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t tail_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void tail_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void tail_raise_to(uint64_t *p, uint64_t v) {
        uint64_t seen = __atomic_load_n(p, __ATOMIC_ACQUIRE);
        while (seen < v && !__atomic_compare_exchange_n(p, &seen, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    }
    static inline void tail_fence(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    """
    uint64_t load_acquire "tail_load"(const uint64_t* pointer) nogil
    void store_release "tail_store"(uint64_t* pointer, uint64_t value) nogil
    void raise_to "tail_raise_to"(uint64_t* pointer, uint64_t value) nogil
    void fence_acquire "tail_fence"() nogil


cdef enum:
    FILE_MODE = 0o666          # every instance maps every ring, whatever user it runs as
    TAIL_VERSION = 1
    CONTROL_VERSION = 1

cdef uint64_t TAIL_MAGIC = 0x4c494154594150ULL      # "PAYTAIL"
cdef uint64_t CONTROL_MAGIC = 0x43544e43594150ULL   # "PAYCNTC"

CONTROL_FILE = "ledger-tail-control.shm"
DEFAULT_CAPACITY = 65536


cdef inline TailHeader* ring_header(const RingView* view) noexcept nogil:
    return <TailHeader*>view.base


cdef inline TailEntry* ring_entries(const RingView* view) noexcept nogil:
    return <TailEntry*>(view.base + sizeof(TailHeader))


cdef inline size_t ring_file_size(int64_t capacity) noexcept nogil:
    return sizeof(TailHeader) + capacity * sizeof(TailEntry)


cdef int64_t file_size(int fd, str path) except -1:
    cdef struct_stat status
    if fstat(fd, &status) != 0:
        raise_os_error(path)
    return status.st_size


cdef int map_ring(RingView* view, size_t size, bint writable, str path) except -1:
    # Every page mapped now, not at a first touch while serving (a page fault
    # costs up to half a millisecond on a VM).
    cdef void* base = mmap(NULL, size, PROT_READ | (PROT_WRITE if writable else 0), MAP_SHARED | MAP_POPULATE,
                           view.fd, 0)
    if base == MAP_FAILED:
        raise_os_error(path)
    if view.base != NULL:
        munmap(view.base, view.mapped_size)
    view.base = <char*>base
    view.mapped_size = size
    return 0


cdef void release_view(RingView* view) noexcept nogil:
    if view.base != NULL:
        munmap(view.base, view.mapped_size)
        view.base = NULL
    if view.fd >= 0:
        close(view.fd)
        view.fd = -1


cdef bint ring_is_valid(const TailHeader* header, size_t mapped_size) noexcept nogil:
    return (header.magic == TAIL_MAGIC and header.version == TAIL_VERSION
            and header.entry_size == sizeof(TailEntry) and header.capacity >= 1
            and ring_file_size(header.capacity) <= mapped_size)


cdef Py_ssize_t published(const RingView* view) noexcept nogil:
    """How many entries the ring holds now (published, not dropped)."""
    cdef const TailHeader* header = ring_header(view)
    cdef uint64_t head = load_acquire(&header.head)
    cdef uint64_t count = load_acquire(&header.tail) - head
    return <Py_ssize_t>min(count, <uint64_t>header.capacity)


cdef Py_ssize_t copy_ring(const RingView* view, TailEntry* out, Py_ssize_t room) noexcept nogil:
    """Copy the ring's published entries that were not dropped while copying;
    how many, or -1 when more than `room` are published (copy again, with more room)."""
    cdef const TailHeader* header = ring_header(view)
    cdef const TailEntry* entries = ring_entries(view)
    cdef int64_t capacity = header.capacity
    cdef uint64_t head = load_acquire(&header.head)
    cdef uint64_t tail = load_acquire(&header.tail)
    cdef uint64_t index, still_there
    cdef Py_ssize_t count = 0
    if tail - head > <uint64_t>capacity:
        head = tail - capacity
    if tail - head > <uint64_t>room:
        return -1
    index = head
    while index < tail:
        out[count] = entries[index % <uint64_t>capacity]
        count += 1
        index += 1
    fence_acquire()
    still_there = load_acquire(&header.head)
    if still_there <= head:
        return count
    if still_there >= head + count:
        return 0
    memcpy(out, &out[still_there - head], (count - (still_there - head)) * sizeof(TailEntry))
    return count - (still_there - head)


cdef class TailSnapshot:
    """What every instance's tail held at one moment, to be added to a summary
    of the payments record read just after it."""
    cdef CopiedRing rings[REGISTRY_SLOTS]
    cdef int ring_count
    cdef list names

    def __dealloc__(self):
        cdef int i
        for i in range(self.ring_count):
            free(self.rings[i].entries)

    def entries(self) -> list:
        """(instance, seq, generation, processor, requested_at_ms, cents) of
        every entry copied: for inspection."""
        cdef const TailEntry* entry
        cdef Py_ssize_t i
        cdef int ring
        copied = []
        for ring in range(self.ring_count):
            for i in range(self.rings[ring].count):
                entry = &self.rings[ring].entries[i]
                copied.append((self.names[ring], entry.seq, entry.generation, entry.processor,
                               entry.requested_at_ms, entry.cents))
        return copied

    def totals(self, dict committed_seqs, uint64_t generation, from_ms=None, to_ms=None) -> tuple:
        """(default count, default cents, fallback count, fallback cents) of the
        entries of `generation` with requestedAt in [from_ms, to_ms] and a
        sequence number above what the record had committed for their
        instance (committed_seqs: instance name -> sequence number)."""
        cdef int64_t first = INT64_MIN if from_ms is None else from_ms
        cdef int64_t last = INT64_MAX if to_ms is None else to_ms
        cdef ProcessorSums sums
        cdef uint64_t committed
        cdef const TailEntry* entry
        cdef Py_ssize_t i
        cdef int ring
        memset(&sums, 0, sizeof(sums))
        for ring in range(self.ring_count):
            committed = committed_seqs.get(self.names[ring], 0)
            for i in range(self.rings[ring].count):
                entry = &self.rings[ring].entries[i]
                if (entry.seq > committed and entry.generation == generation
                        and first <= entry.requested_at_ms <= last):
                    add_payments(&sums, entry.processor, 1, <uint64_t>entry.cents)
        return sums_tuple(&sums)


cdef class LedgerTail:
    """This instance's tail (written only here, under the GIL) and a reader
    of every instance's, in `directory`. capacity: settlements the tail holds
    before the payments record must commit some; the dispatcher keeps room
    for what it has in flight (`room`)."""

    def __cinit__(self):
        cdef int slot
        self.own.fd = -1
        for slot in range(REGISTRY_SLOTS):
            self.peers[slot].fd = -1
        self.own_slot = -1

    def __init__(self, str directory, str instance, int64_t capacity=DEFAULT_CAPACITY):
        check_instance_name(instance)
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.directory = directory
        self.instance = instance
        self.capacity = capacity
        control_path = os.path.join(directory, CONTROL_FILE)
        cdef int control_fd = open_or_raise(control_path, O_RDWR | O_CREAT, FILE_MODE)
        try:
            # Held until registered: instances attach one at a time.
            if lock_file(control_fd, F_WRLCK, True) != 0:
                raise_os_error(control_path)
            self._map_control(control_fd, control_path)
            self._open_own_ring()
            self._register()
        finally:
            lock_file(control_fd, F_UNLCK, False)
            close(control_fd)

    def __dealloc__(self):
        self._release()

    def _map_control(self, int fd, str path):
        if file_size(fd, path) < <int64_t>sizeof(ControlHeader) and ftruncate(fd, sizeof(ControlHeader)) != 0:
            raise_os_error(path)
        cdef void* base = mmap(NULL, sizeof(ControlHeader), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            raise_os_error(path)
        self.control = <ControlHeader*>base
        if self.control.magic == 0:
            self.control.version = CONTROL_VERSION
            self.control.slot_count = REGISTRY_SLOTS
            store_release(&self.control.magic, CONTROL_MAGIC)
        elif (self.control.magic != CONTROL_MAGIC or self.control.version != CONTROL_VERSION
              or self.control.slot_count != REGISTRY_SLOTS):
            raise ValueError(f"{path} is not a ledger tail control file of version {CONTROL_VERSION}")

    def _ring_path(self, str instance) -> str:
        return os.path.join(self.directory, f"ledger-tail-{instance}.shm")

    def _slot_name(self, int slot) -> str:
        return slot_name(&self.control.slots[slot])

    def _open_own_ring(self):
        path = self._ring_path(self.instance)
        self.own.fd = open_or_raise(path, O_RDWR | O_CREAT, FILE_MODE)
        if lock_file(self.own.fd, F_WRLCK, False) != 0:
            if errno == EAGAIN or errno == EACCES:
                raise RuntimeError(f"instance {self.instance!r} already has a ledger tail open in {self.directory}")
            raise_os_error(path)
        cdef size_t size = ring_file_size(self.capacity)
        cdef bint fits = <size_t>file_size(self.own.fd, path) == size
        if not fits and ftruncate(self.own.fd, size) != 0:
            raise_os_error(path)
        map_ring(&self.own, size, True, path)
        cdef TailHeader* header = ring_header(&self.own)
        if fits and ring_is_valid(header, size) and header.capacity == self.capacity:
            return  # what a previous run left stays counted until reset()
        memset(header, 0, sizeof(TailHeader))
        header.version = TAIL_VERSION
        header.entry_size = sizeof(TailEntry)
        header.capacity = self.capacity
        store_release(&header.magic, TAIL_MAGIC)

    def _register(self):
        self.own_slot = register_instance(self.control.slots, self.instance)
        if self.own_slot < 0:
            raise RuntimeError(f"the ledger tail registry in {self.directory} is full ({REGISTRY_SLOTS} instances)")

    def _ensure_open(self):
        if self.control == NULL:
            raise ValueError("the ledger tail is closed")

    # --- this instance's ring ----------------------------------------------------------

    def append(self, uint64_t seq, uint64_t generation, int processor, int64_t requested_at_ms,
               int64_t cents) -> bool:
        """Publish one settlement; False when the ring is full (the caller
        keeps room for what it has in flight, so this means a stalled record)."""
        self._ensure_open()
        if processor != 0 and processor != 1:
            raise ValueError(f"processor must be 0 (default) or 1 (fallback), not {processor}")
        cdef TailHeader* header = ring_header(&self.own)
        cdef uint64_t tail = header.tail
        if tail - load_acquire(&header.head) >= <uint64_t>self.capacity:
            return False
        cdef TailEntry* entry = &ring_entries(&self.own)[tail % <uint64_t>self.capacity]
        entry.seq = seq
        entry.requested_at_ms = requested_at_ms
        entry.cents = cents
        entry.generation = generation
        entry.processor = processor
        store_release(&header.tail, tail + 1)
        return True

    def release_through(self, uint64_t committed_seq) -> None:
        """The payments record committed every settlement up to committed_seq:
        drop them (entries are in sequence order)."""
        self._ensure_open()
        cdef TailHeader* header = ring_header(&self.own)
        cdef const TailEntry* entries = ring_entries(&self.own)
        cdef uint64_t head = header.head
        cdef uint64_t tail = header.tail
        while head < tail and entries[head % <uint64_t>self.capacity].seq <= committed_seq:
            head += 1
        store_release(&header.head, head)

    def reset(self) -> None:
        """Drop everything: at start, once the payments record holds what the
        journal had (what an earlier run left here is in it, or lost with it)."""
        self._ensure_open()
        cdef TailHeader* header = ring_header(&self.own)
        store_release(&header.head, header.tail)

    @property
    def room(self) -> int:
        """Settlements the ring can still take."""
        self._ensure_open()
        cdef TailHeader* header = ring_header(&self.own)
        return self.capacity - <int64_t>(header.tail - header.head)

    def __len__(self) -> int:
        return self.capacity - self.room

    # --- the purge generation ------------------------------------------------------------

    @property
    def generation(self) -> int:
        self._ensure_open()
        return load_acquire(&self.control.generation)

    def raise_generation(self, uint64_t generation) -> None:
        """Every instance counts in `generation` from now on, if it is newer
        (a purge made durable by the payments record, or the record's
        generation when the shared directory was lost)."""
        self._ensure_open()
        raise_to(&self.control.generation, generation)

    # --- reading every ring -------------------------------------------------------------------

    def snapshot(self) -> TailSnapshot:
        """Every registered instance's entries, as they are now."""
        self._ensure_open()
        cdef TailSnapshot snapshot = TailSnapshot.__new__(TailSnapshot)
        cdef RingView* view
        cdef CopiedRing* copied
        cdef int slot
        cdef Py_ssize_t room
        snapshot.names = []
        for slot in range(REGISTRY_SLOTS):
            # Slots are taken in order and never freed: the first free one ends the list.
            if load_acquire(&self.control.slots[slot].name_length) == 0:
                break
            view = &self.own if slot == self.own_slot else self._peer(slot)
            if view == NULL:
                continue
            copied = &snapshot.rings[snapshot.ring_count]
            copied.count = -1
            # Sized to what the ring holds now, with room for a few more appended meanwhile.
            room = published(view) + 64
            while copied.count < 0:
                free(copied.entries)
                copied.entries = <TailEntry*>malloc(room * sizeof(TailEntry))
                if copied.entries == NULL:
                    raise MemoryError("ledger tail snapshot")
                copied.count = copy_ring(view, copied.entries, room)
                room = 2 * room
            copied.slot = slot
            snapshot.ring_count += 1
            snapshot.names.append(self._slot_name(slot))
        return snapshot

    cdef RingView* _peer(self, int slot) except? NULL:
        """The peer's ring, mapped (again, if its size changed); NULL while it
        has none yet."""
        cdef RingView* view = &self.peers[slot]
        cdef int64_t size
        path = self._ring_path(self._slot_name(slot))
        if view.fd < 0:
            view.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if os.path.exists(path) else -1
            if view.fd < 0:
                return NULL
        size = file_size(view.fd, path)
        if <size_t>size != view.mapped_size:
            if size < <int64_t>sizeof(TailHeader):
                return NULL
            map_ring(view, size, False, path)
        if not ring_is_valid(ring_header(view), view.mapped_size):
            return NULL
        return view

    def _release(self):
        cdef int slot
        release_view(&self.own)
        for slot in range(REGISTRY_SLOTS):
            release_view(&self.peers[slot])
        if self.control != NULL:
            munmap(self.control, sizeof(ControlHeader))
            self.control = NULL

    def close(self) -> None:
        """Unmap every file; the rings stay in the directory."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._release()
