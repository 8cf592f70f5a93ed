"""The exact payment ledger, shared through memory-mapped files by every
service instance on a host.

Each instance owns one region: a treap of per-millisecond totals that only it
writes. Any instance answers the global summary by reading every region under
its seqlock, so a range query costs O(log n) per region and takes no lock.
"""
import os

from libc.errno cimport EACCES, EAGAIN, ENOENT, errno
from libc.stdint cimport INT64_MAX, INT64_MIN, int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.fcntl cimport F_RDLCK, F_UNLCK, F_WRLCK, O_CLOEXEC, O_CREAT, O_RDONLY, O_RDWR, SEEK_SET
from posix.fcntl cimport fcntl, flock
from posix.fcntl cimport open as open_file
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, ftruncate

from paycore.core.instance_registry cimport check_instance_name, register_instance
from paycore.core.posix_files cimport open_or_raise, raise_os_error


cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t ledger_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t ledger_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int64_t ledger_load_i64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int32_t ledger_load_i32(const int32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void ledger_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void ledger_increment(uint64_t *p) { __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL); }
    static inline void ledger_raise_to(uint64_t *p, uint64_t v) {
        uint64_t seen = __atomic_load_n(p, __ATOMIC_ACQUIRE);
        while (seen < v && !__atomic_compare_exchange_n(p, &seen, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    }
    static inline void ledger_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void ledger_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    """
    uint64_t load_acquire "ledger_load_acquire"(const uint64_t* pointer) nogil
    uint64_t load_relaxed "ledger_load_relaxed"(const uint64_t* pointer) nogil
    int64_t load_i64 "ledger_load_i64"(const int64_t* pointer) nogil
    int32_t load_i32 "ledger_load_i32"(const int32_t* pointer) nogil
    void store_release "ledger_store_release"(uint64_t* pointer, uint64_t value) nogil
    void atomic_increment "ledger_increment"(uint64_t* pointer) nogil
    void raise_to "ledger_raise_to"(uint64_t* pointer, uint64_t value) nogil
    void fence_acquire "ledger_fence_acquire"() nogil
    void fence_release "ledger_fence_release"() nogil


cdef extern from "<fcntl.h>" nogil:
    # Open-file-description locks: held per open file, released when the
    # owner process dies, and testable without taking them.
    enum: F_OFD_GETLK
    enum: F_OFD_SETLK
    enum: F_OFD_SETLKW


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef enum:
    FILE_MODE = 0o666          # every instance maps every region, whatever user it runs as
    LEDGER_VERSION = 1
    MAX_CAPACITY = 2147483647  # node indices are int32
    SPIN_ATTEMPTS = 64         # busy retries before yielding the CPU to the writer
    LIVENESS_INTERVAL = 1024   # retries between checks that the writer is still alive

cdef enum ReadOutcome:
    READ_DONE     # totals added, or the region does not count (other generation, not a region)
    READ_RETRY    # the owner was writing
    READ_REMAP    # the region grew past this mapping
    READ_CORRUPT  # a stable snapshot that is not a tree

cdef uint64_t REGION_MAGIC = 0x524744454c594150ULL   # "PAYLEDGR"
cdef uint64_t CONTROL_MAGIC = 0x434744454c594150ULL  # "PAYLEDGC"

CONTROL_FILE = "ledger-control.shm"

assert sizeof(RegionHeader) <= NODES_OFFSET


# --- totals -------------------------------------------------------------------

cdef inline void totals_add(Totals* target, const Totals* delta) noexcept nogil:
    cdef int processor
    for processor in range(PROCESSOR_COUNT):
        target.count[processor] += delta.count[processor]
        target.cents[processor] += delta.cents[processor]


cdef inline void totals_subtract(Totals* target, const Totals* delta) noexcept nogil:
    cdef int processor
    for processor in range(PROCESSOR_COUNT):
        target.count[processor] -= delta.count[processor]
        target.cents[processor] -= delta.cents[processor]


cdef inline void totals_add_shared(Totals* target, const Totals* shared) noexcept nogil:
    """totals_add for memory the owner may be writing: each field is read once."""
    cdef int processor
    for processor in range(PROCESSOR_COUNT):
        target.count[processor] += load_i64(&shared.count[processor])
        target.cents[processor] += load_i64(&shared.cents[processor])


cdef inline void add_subtree(Totals* target, const LedgerNode* nodes, int32_t index) noexcept nogil:
    if index != NIL:
        totals_add(target, &nodes[index].subtree)


# --- the region files -----------------------------------------------------------

cdef inline RegionHeader* region_header(const RegionView* view) noexcept nogil:
    return <RegionHeader*>view.base


cdef inline LedgerNode* region_nodes(const RegionView* view) noexcept nogil:
    return <LedgerNode*>(view.base + NODES_OFFSET)


cdef inline int64_t region_file_size(int64_t capacity) noexcept nogil:
    return NODES_OFFSET + capacity * <int64_t>sizeof(LedgerNode)


cdef bint region_is_valid(const RegionHeader* header, int64_t mapped_capacity) noexcept nogil:
    return (header.magic == REGION_MAGIC and header.version == LEDGER_VERSION
            and header.node_size == sizeof(LedgerNode)
            and 1 <= header.capacity <= mapped_capacity and header.capacity <= MAX_CAPACITY
            and 0 <= header.node_count <= header.capacity)


# --- writing a region (owner only) ---------------------------------------------

cdef inline void begin_write(RegionHeader* header) noexcept nogil:
    # Release: the pending record is complete before the sequence turns odd.
    # The fence: no tree store moves before the odd sequence.
    store_release(&header.sequence, (header.sequence + 1) | 1)
    fence_release()


cdef inline void end_write(RegionHeader* header) noexcept nogil:
    header.pending.node_index = NIL
    store_release(&header.sequence, header.sequence + 1)


cdef void reset_region(RegionHeader* header, int64_t capacity, uint64_t generation) noexcept nogil:
    """Make the header describe an empty region; call inside a write section."""
    header.pending.node_index = NIL
    header.version = LEDGER_VERSION
    header.node_size = sizeof(LedgerNode)
    header.capacity = capacity
    header.node_count = 0
    header.root = NIL
    header.generation = generation
    # Last, so that a file whose initialisation was cut short stays invalid.
    store_release(&header.magic, REGION_MAGIC)


cdef inline uint32_t priority_of(int64_t key) noexcept nogil:
    """The splitmix64 finaliser: keys arriving in time order still get
    independent-looking priorities, so the treap stays O(log n) deep."""
    cdef uint64_t mixed = <uint64_t>key + 0x9E3779B97F4A7C15ULL
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9ULL
    mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EBULL
    return <uint32_t>((mixed ^ (mixed >> 31)) >> 32)


cdef inline bint outranks(const LedgerNode* node, uint32_t priority, int64_t key) noexcept nogil:
    return node.priority > priority or (node.priority == priority and node.key > key)


cdef int32_t find(const RegionHeader* header, const LedgerNode* nodes, int64_t key) noexcept nogil:
    cdef int32_t index = header.root
    while index != NIL:
        if nodes[index].key == key:
            return index
        index = nodes[index].left if key < nodes[index].key else nodes[index].right
    return NIL


cdef int32_t* descend(RegionHeader* header, LedgerNode* nodes, int64_t key, uint32_t priority,
                      const Totals* delta) noexcept nogil:
    """Walk from the root towards key through the nodes that outrank it,
    adding delta to their subtree totals: key ends up below all of them.
    Returns the link where the walk stopped: to key's node, or to the subtree
    a new node for key takes over."""
    cdef int32_t* link = &header.root
    cdef LedgerNode* node
    while link[0] != NIL:
        node = &nodes[link[0]]
        if node.key == key or not outranks(node, priority, key):
            break
        totals_add(&node.subtree, delta)
        link = &node.left if key < node.key else &node.right
    return link


cdef void refresh_spine(LedgerNode* nodes, int32_t top, bint along_right) noexcept nogil:
    """Recompute the subtree totals of the nodes a split chained from top along
    their right (or left) links. Each keeps its other child whole, so a chain
    node's subtree is the sum, over it and the chain below it, of own totals
    plus the kept child's subtree."""
    cdef Totals below
    cdef Totals share
    cdef int32_t index
    cdef LedgerNode* node
    cdef int sweep
    memset(&below, 0, sizeof(Totals))
    for sweep in range(2):
        index = top
        while index != NIL:
            node = &nodes[index]
            share = node.own
            add_subtree(&share, nodes, node.left if along_right else node.right)
            if sweep == 0:
                totals_add(&below, &share)
            else:
                node.subtree = below
                totals_subtract(&below, &share)
            index = node.right if along_right else node.left


cdef void take_over(LedgerNode* nodes, int32_t* link, int32_t index) noexcept nogil:
    """Put the unlinked node index where link points; the subtree there splits
    by the node's key into its two children."""
    cdef LedgerNode* node = &nodes[index]
    cdef int32_t* smaller = &node.left
    cdef int32_t* larger = &node.right
    cdef int32_t current = link[0]
    cdef LedgerNode* moved
    while current != NIL:
        moved = &nodes[current]
        if moved.key < node.key:
            smaller[0] = current
            smaller = &moved.right
            current = moved.right
        else:
            larger[0] = current
            larger = &moved.left
            current = moved.left
    smaller[0] = NIL
    larger[0] = NIL
    refresh_spine(nodes, node.left, True)
    refresh_spine(nodes, node.right, False)
    node.subtree = node.own
    add_subtree(&node.subtree, nodes, node.left)
    add_subtree(&node.subtree, nodes, node.right)
    link[0] = index


cdef inline void link_node(RegionHeader* header, LedgerNode* nodes, int32_t index) noexcept nogil:
    cdef LedgerNode* node = &nodes[index]
    take_over(nodes, descend(header, nodes, node.key, node.priority, &node.own), index)


cdef void prepare_pending(RegionHeader* header, const LedgerNode* nodes, int processor, int64_t key,
                          int64_t cents, bint resets_region, uint64_t generation) noexcept nogil:
    cdef PendingRecord* pending = &header.pending
    cdef int32_t existing = NIL if resets_region else find(header, nodes, key)
    pending.processor = processor
    pending.key = key
    pending.resets_region = resets_region
    pending.generation = generation
    pending.new_node = existing == NIL
    if existing == NIL:
        pending.count_after = 1
        pending.cents_after = cents
        pending.node_count_after = 1 if resets_region else header.node_count + 1
        pending.node_index = <int32_t>(pending.node_count_after - 1)
    else:
        pending.count_after = nodes[existing].own.count[processor] + 1
        pending.cents_after = nodes[existing].own.cents[processor] + cents
        pending.node_count_after = header.node_count
        pending.node_index = existing


cdef void apply_pending(RegionHeader* header, LedgerNode* nodes) noexcept nogil:
    """Store the pending record's own totals and node count (idempotent); the
    caller then links the tree."""
    cdef PendingRecord* pending = &header.pending
    cdef LedgerNode* node = &nodes[pending.node_index]
    if pending.resets_region:
        header.generation = pending.generation
        header.root = NIL
    if pending.new_node:
        node.key = pending.key
        node.priority = priority_of(pending.key)
        memset(&node.own, 0, sizeof(Totals))
    node.own.count[pending.processor] = pending.count_after
    node.own.cents[pending.processor] = pending.cents_after
    header.node_count = pending.node_count_after


cdef bint pending_is_valid(const RegionHeader* header) noexcept nogil:
    cdef const PendingRecord* pending = &header.pending
    return (pending.processor < PROCESSOR_COUNT and 0 <= pending.node_index
            and pending.node_index < pending.node_count_after <= header.capacity)


cdef void write_record(RegionHeader* header, LedgerNode* nodes, int processor, int64_t key,
                       int64_t cents, bint resets_region, uint64_t generation) noexcept nogil:
    """Add one payment; the region has room for a new node."""
    prepare_pending(header, nodes, processor, key, cents, resets_region, generation)
    begin_write(header)
    apply_pending_and_link(header, nodes, cents)
    end_write(header)


cdef void apply_pending_and_link(RegionHeader* header, LedgerNode* nodes, int64_t cents) noexcept nogil:
    """Inside a write section: store the pending record and fix the tree's totals."""
    cdef PendingRecord* pending = &header.pending
    cdef Totals delta
    apply_pending(header, nodes)
    if pending.new_node:
        link_node(header, nodes, pending.node_index)
    else:
        memset(&delta, 0, sizeof(Totals))
        delta.count[pending.processor] = 1
        delta.cents[pending.processor] = cents
        descend(header, nodes, pending.key, nodes[pending.node_index].priority, &delta)
        totals_add(&nodes[pending.node_index].subtree, &delta)


cdef void write_records(RegionHeader* header, LedgerNode* nodes, const RestoredPayment* payments,
                        Py_ssize_t count, uint64_t generation) noexcept nogil:
    """Replace the region's contents in one write section: readers see the old
    totals or the new ones, never a part. A writer killed halfway leaves a
    valid prefix (each payment goes through the pending record)."""
    cdef Py_ssize_t i
    begin_write(header)
    reset_region(header, header.capacity, generation)
    for i in range(count):
        prepare_pending(header, nodes, payments[i].processor, payments[i].requested_at_ms,
                        payments[i].cents, False, generation)
        apply_pending_and_link(header, nodes, payments[i].cents)
    end_write(header)


cdef void rebuild(RegionHeader* header, LedgerNode* nodes) noexcept nogil:
    """Relink nodes [0, node_count) from their keys and own totals alone."""
    cdef int32_t index
    header.root = NIL
    for index in range(<int32_t>header.node_count):
        nodes[index].priority = priority_of(nodes[index].key)
        link_node(header, nodes, index)


# --- reading a region (any process) ---------------------------------------------

cdef bint add_prefix(const LedgerNode* nodes, int32_t root, int64_t limit, int64_t last_key,
                     Totals* out) noexcept nogil:
    """Add the totals of the keys <= last_key. False when the walk leaves the
    nodes in use or visits more of them than exist: not a tree, the snapshot is
    torn or corrupt."""
    cdef int32_t index = root
    cdef int32_t left
    cdef int64_t visited = 0
    cdef const LedgerNode* node
    while index != NIL:
        if index < 0 or index >= limit or visited == limit:
            return False
        visited += 1
        node = &nodes[index]
        if load_i64(&node.key) <= last_key:
            totals_add_shared(out, &node.own)
            left = load_i32(&node.left)
            if left != NIL:
                if left < 0 or left >= limit:
                    return False
                totals_add_shared(out, &nodes[left].subtree)
            index = load_i32(&node.right)
        else:
            index = load_i32(&node.left)
    return True


cdef ReadOutcome read_region(const RegionView* view, uint64_t generation, const RangeQuery* query,
                             Totals* out) noexcept nogil:
    """One seqlock read attempt: add the region's totals over the query to out."""
    cdef const RegionHeader* header = region_header(view)
    cdef const LedgerNode* nodes = region_nodes(view)
    cdef ReadOutcome outcome = READ_DONE
    cdef Totals in_range
    cdef Totals before_range
    cdef int64_t limit
    cdef int32_t root
    cdef uint64_t sequence = load_acquire(&header.sequence)
    if sequence & 1:
        return READ_RETRY
    cdef bint counts = (load_relaxed(&header.magic) == REGION_MAGIC
                        and load_relaxed(&header.generation) == generation)
    memset(&in_range, 0, sizeof(Totals))
    memset(&before_range, 0, sizeof(Totals))
    if counts and load_i64(&header.capacity) > view.mapped_capacity:
        outcome = READ_REMAP
    elif counts:
        limit = min(load_i64(&header.node_count), view.mapped_capacity)
        root = load_i32(&header.root)
        if not add_prefix(nodes, root, limit, query.last_key, &in_range):
            outcome = READ_CORRUPT
        elif query.first_key != INT64_MIN and not add_prefix(nodes, root, limit, query.first_key - 1,
                                                              &before_range):
            outcome = READ_CORRUPT
    fence_acquire()
    if load_relaxed(&header.sequence) != sequence:
        return READ_RETRY
    if counts and outcome == READ_DONE:
        totals_subtract(&in_range, &before_range)
        totals_add(out, &in_range)
    return outcome


cdef bint owner_alive(int fd) noexcept nogil:
    """Whether some process holds the region's owner lock. A failed probe
    counts as alive: waiting is safe, dropping a live region is not."""
    cdef flock probe
    memset(&probe, 0, sizeof(flock))
    probe.l_type = F_RDLCK
    probe.l_whence = SEEK_SET
    if fcntl(fd, F_OFD_GETLK, &probe) != 0:
        return True
    return probe.l_type != F_UNLCK


# --- files and mappings ------------------------------------------------------------

cdef int64_t file_size(int fd, str path) except -1:
    cdef struct_stat status
    if fstat(fd, &status) != 0:
        raise_os_error(path)
    return status.st_size


cdef int lock_file(int fd, short lock_type, bint wait) noexcept nogil:
    cdef flock request
    memset(&request, 0, sizeof(flock))
    request.l_type = lock_type
    request.l_whence = SEEK_SET
    return fcntl(fd, F_OFD_SETLKW if wait else F_OFD_SETLK, &request)


cdef int map_region(RegionView* view, int64_t size, bint writable, str path) except -1:
    """Map size bytes of view.fd, replacing any earlier mapping of the view."""
    cdef void* base = mmap(NULL, size, PROT_READ | (PROT_WRITE if writable else 0), MAP_SHARED,
                           view.fd, 0)
    if base == MAP_FAILED:
        raise_os_error(path)
    if view.base != NULL:
        munmap(view.base, view.mapped_size)
    view.base = <char*>base
    view.mapped_size = size
    view.mapped_capacity = (size - NODES_OFFSET) // <int64_t>sizeof(LedgerNode)
    return 0


cdef void release_view(RegionView* view) noexcept nogil:
    if view.base != NULL:
        munmap(view.base, view.mapped_size)
        view.base = NULL
    if view.fd >= 0:
        close(view.fd)
        view.fd = -1


cdef int set_query(RangeQuery* query, object from_ms, object to_ms) except -1:
    query.first_key = INT64_MIN if from_ms is None else from_ms
    query.last_key = INT64_MAX if to_ms is None else to_ms
    return 0


cdef tuple totals_tuple(const Totals* totals):
    return (totals.count[0], totals.cents[0], totals.count[1], totals.cents[1])


cdef class Ledger:
    """The payments confirmed by each processor, summed over every instance
    whose region lives in `directory`.

    This instance records into its own region file and answers summaries over
    all live regions. The region survives a restart of its owner. A purge, from
    any instance, starts a new generation: regions of older generations stop
    counting at once, and each owner empties its region on its next record.

    Every method runs under the GIL, which is what keeps a single writer per
    region within the owning process.

    Crash recovery: an owner killed inside a write leaves the seqlock odd and
    the record it was writing in the header. Reopening redoes that record (it
    holds the after-values, so this is exact) and rebuilds every link and
    subtree total from the nodes' keys and own totals, which are the only data
    trusted. A header that fails validation (not a region of this version, or
    a pending record pointing outside the nodes) cannot be repaired: the region
    is emptied. Until the owner reopens it, other instances leave a region
    whose owner died mid-write out of their summaries instead of waiting.

    Region files must not be deleted while instances have them open: a peer
    keeps reading the file it mapped.
    """

    def __cinit__(self):
        cdef int slot
        self.own.fd = -1
        for slot in range(REGISTRY_SLOTS):
            self.peers[slot].fd = -1
        self.own_slot = -1

    def __init__(self, str directory, str instance, Py_ssize_t initial_capacity=65536):
        check_instance_name(instance)
        if not 1 <= initial_capacity <= MAX_CAPACITY:
            raise ValueError(f"initial_capacity must be in [1, {MAX_CAPACITY}]")
        self.directory = directory
        self.instance = instance
        control_path = os.path.join(directory, CONTROL_FILE)
        # Held until registered: instances attach one at a time.
        cdef int control_fd = open_or_raise(control_path, O_RDWR | O_CREAT, FILE_MODE)
        try:
            if lock_file(control_fd, F_WRLCK, True) != 0:
                raise_os_error(control_path)
            self._map_control(control_fd, control_path)
            self._open_own_region(initial_capacity)
            self._register()
        finally:
            # Explicitly: the mapping keeps the open file, and with it the lock, alive.
            lock_file(control_fd, F_UNLCK, False)
            close(control_fd)

    def __dealloc__(self):
        self._release()

    # --- attaching ----------------------------------------------------------------

    cdef str _region_path(self, str instance):
        return os.path.join(self.directory, f"ledger-region-{instance}.shm")

    cdef str _slot_path(self, int slot):
        cdef RegistrySlot* entry = &self.control.slots[slot]
        return self._region_path(entry.name[:entry.name_length].decode("ascii"))

    cdef int _map_control(self, int fd, str path) except -1:
        if file_size(fd, path) < <int64_t>sizeof(ControlHeader) and ftruncate(fd, sizeof(ControlHeader)) != 0:
            raise_os_error(path)
        cdef void* base = mmap(NULL, sizeof(ControlHeader), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            raise_os_error(path)
        self.control = <ControlHeader*>base
        if self.control.magic == 0:
            self.control.version = LEDGER_VERSION
            self.control.slot_count = REGISTRY_SLOTS
            self.control.magic = CONTROL_MAGIC
        elif (self.control.magic != CONTROL_MAGIC or self.control.version != LEDGER_VERSION
              or self.control.slot_count != REGISTRY_SLOTS):
            raise ValueError(f"{path} is not a ledger control file of version {LEDGER_VERSION}")
        return 0

    cdef int _open_own_region(self, int64_t initial_capacity) except -1:
        path = self._region_path(self.instance)
        self.own.fd = open_or_raise(path, O_RDWR | O_CREAT, FILE_MODE)
        if lock_file(self.own.fd, F_WRLCK, False) != 0:
            if errno == EAGAIN or errno == EACCES:
                raise RuntimeError(f"instance {self.instance!r} already has a ledger open in {self.directory}")
            raise_os_error(path)
        cdef int64_t size = file_size(self.own.fd, path)
        cdef RegionHeader* header
        if size >= region_file_size(1):
            map_region(&self.own, size, True, path)
            header = region_header(&self.own)
            if region_is_valid(header, self.own.mapped_capacity):
                if header.sequence & 1:
                    self._recover()
                return 0
        if size < region_file_size(initial_capacity):
            size = region_file_size(initial_capacity)
            if ftruncate(self.own.fd, size) != 0:
                raise_os_error(path)
            map_region(&self.own, size, True, path)
        header = region_header(&self.own)
        begin_write(header)
        reset_region(header, min(self.own.mapped_capacity, <int64_t>MAX_CAPACITY),
                     load_acquire(&self.control.generation))
        end_write(header)
        return 0

    cdef void _recover(self) noexcept nogil:
        cdef RegionHeader* header = region_header(&self.own)
        begin_write(header)
        if header.pending.node_index != NIL:
            if not pending_is_valid(header):
                reset_region(header, header.capacity, load_acquire(&self.control.generation))
                end_write(header)
                return
            apply_pending(header, region_nodes(&self.own))
        rebuild(header, region_nodes(&self.own))
        end_write(header)

    cdef int _register(self) except -1:
        self.own_slot = register_instance(self.control.slots, self.instance)
        if self.own_slot < 0:
            raise RuntimeError(f"the ledger registry in {self.directory} is full ({REGISTRY_SLOTS} instances)")
        return 0

    cdef int _open_peer(self, int slot) except -1:
        """Map the region of a registered peer; 0 while its file is not there yet."""
        cdef RegionView* view = &self.peers[slot]
        path = self._slot_path(slot)
        view.fd = open_file(os.fsencode(path), O_RDONLY | O_CLOEXEC)
        if view.fd < 0:
            if errno == ENOENT:
                return 0
            raise_os_error(path)
        cdef int64_t size = file_size(view.fd, path)
        if size < region_file_size(1):
            release_view(view)
            return 0
        map_region(view, size, False, path)
        return 1

    # --- writing --------------------------------------------------------------------

    cdef int _ensure_open(self) except -1:
        if self.control == NULL:
            raise ValueError("the ledger is closed")
        return 0

    cdef int _grow(self) except -1:
        cdef RegionHeader* header = region_header(&self.own)
        if header.capacity == MAX_CAPACITY:
            raise OverflowError(f"the ledger region of {self.instance!r} is full")
        cdef int64_t capacity = min(2 * header.capacity, <int64_t>MAX_CAPACITY)
        if capacity > self.own.mapped_capacity:
            path = self._region_path(self.instance)
            if ftruncate(self.own.fd, region_file_size(capacity)) != 0:
                raise_os_error(path)
            map_region(&self.own, region_file_size(capacity), True, path)
            header = region_header(&self.own)
        begin_write(header)
        header.capacity = capacity
        end_write(header)
        return 0

    cdef int record_payment(self, int processor, int64_t requested_at_ms, int64_t cents) except -1:
        if processor != 0 and processor != 1:
            raise ValueError(f"processor must be 0 (default) or 1 (fallback), not {processor}")
        self._ensure_open()
        cdef uint64_t generation = load_acquire(&self.control.generation)
        cdef RegionHeader* header = region_header(&self.own)
        cdef bint stale = header.generation != generation
        if not stale and header.node_count == header.capacity:
            self._grow()
            header = region_header(&self.own)
        write_record(header, region_nodes(&self.own), processor, requested_at_ms, cents, stale, generation)
        return 0

    # --- reading --------------------------------------------------------------------

    cdef int _add_region_totals(self, RegionView* view, int slot, uint64_t generation,
                                const RangeQuery* query, Totals* out) except -1:
        cdef int64_t attempts = 0
        cdef ReadOutcome outcome
        while True:
            outcome = read_region(view, generation, query, out)
            if outcome == READ_DONE:
                return 0
            if outcome == READ_REMAP:
                self._remap_peer(view, slot)
            elif outcome == READ_CORRUPT:
                raise RuntimeError(f"ledger region {self._slot_path(slot)} is corrupt")
            else:
                attempts += 1
                if attempts > SPIN_ATTEMPTS:
                    sched_yield()
                if attempts % LIVENESS_INTERVAL == 0 and not owner_alive(view.fd):
                    return 0  # killed mid-write: left out until its owner reopens and repairs it

    cdef int _remap_peer(self, RegionView* view, int slot) except -1:
        path = self._slot_path(slot)
        cdef int64_t size = file_size(view.fd, path)
        if size <= region_file_size(view.mapped_capacity):
            raise RuntimeError(f"ledger region {path} claims more nodes than its file holds")
        map_region(view, size, False, path)
        return 0

    cdef int add_global_totals(self, const RangeQuery* query, Totals* out) except -1:
        self._ensure_open()
        cdef uint64_t generation = load_acquire(&self.control.generation)
        cdef RegionView* view
        cdef int slot
        for slot in range(REGISTRY_SLOTS):
            # Slots are taken in order and never freed: the first free one ends the list.
            if load_acquire(&self.control.slots[slot].name_length) == 0:
                break
            if slot == self.own_slot:
                view = &self.own
            else:
                view = &self.peers[slot]
                if view.base == NULL and not self._open_peer(slot):
                    continue
            self._add_region_totals(view, slot, generation, query, out)
        return 0

    cdef int add_local_totals(self, const RangeQuery* query, Totals* out) except -1:
        self._ensure_open()
        return self._add_region_totals(&self.own, self.own_slot, load_acquire(&self.control.generation),
                                       query, out)

    # --- the Python API -------------------------------------------------------------

    def record(self, int processor, int64_t requested_at_ms, int64_t cents):
        """Add one payment confirmed by processor 0 (default) or 1 (fallback)."""
        self.record_payment(processor, requested_at_ms, cents)

    def summary(self, from_ms=None, to_ms=None):
        """(default_count, default_cents, fallback_count, fallback_cents) over all
        live regions, for requestedAt in [from_ms, to_ms]; None is unbounded."""
        return self._summary(from_ms, to_ms, True)

    def local_summary(self, from_ms=None, to_ms=None):
        """As summary(), over this instance's region only."""
        return self._summary(from_ms, to_ms, False)

    cdef tuple _summary(self, object from_ms, object to_ms, bint every_region):
        cdef RangeQuery query
        cdef Totals totals
        set_query(&query, from_ms, to_ms)
        memset(&totals, 0, sizeof(Totals))
        if query.first_key <= query.last_key:
            if every_region:
                self.add_global_totals(&query, &totals)
            else:
                self.add_local_totals(&query, &totals)
        return totals_tuple(&totals)

    def purge(self):
        """Clear the ledger of every instance."""
        self._ensure_open()
        atomic_increment(&self.control.generation)

    @property
    def generation(self):
        """How many purges the ledger directory has seen."""
        self._ensure_open()
        return load_acquire(&self.control.generation)

    def restore(self, uint64_t generation, payments):
        """Replace this instance's region with `payments`, (processor,
        requested_at_ms, cents) triples, as one change for readers: an
        instance rebuilding its share of the ledger from its journal. The
        purge generation is raised to `generation` if it is behind (a ledger
        directory lost while the journal survived)."""
        self._ensure_open()
        cdef Py_ssize_t count = len(payments)
        cdef RestoredPayment* copied = <RestoredPayment*>malloc(max(count, 1) * sizeof(RestoredPayment))
        if copied == NULL:
            raise MemoryError(f"cannot restore {count} payments")
        cdef Py_ssize_t i = 0
        cdef RegionHeader* header
        try:
            for processor, requested_at_ms, cents in payments:
                if processor != 0 and processor != 1:
                    raise ValueError(f"processor must be 0 (default) or 1 (fallback), not {processor}")
                copied[i].processor = processor
                copied[i].requested_at_ms = requested_at_ms
                copied[i].cents = cents
                i += 1
            raise_to(&self.control.generation, generation)
            while region_header(&self.own).capacity < count:
                self._grow()
            header = region_header(&self.own)
            write_records(header, region_nodes(&self.own), copied, count,
                          load_acquire(&self.control.generation))
        finally:
            free(copied)

    def __len__(self):
        """Payments recorded in this instance's region, both processors."""
        self._ensure_open()
        cdef const RegionHeader* header = region_header(&self.own)
        if header.generation != load_acquire(&self.control.generation) or header.root == NIL:
            return 0
        cdef const Totals* totals = &region_nodes(&self.own)[header.root].subtree
        return totals.count[0] + totals.count[1]

    cdef void _release(self) noexcept nogil:
        cdef int slot
        release_view(&self.own)
        for slot in range(REGISTRY_SLOTS):
            release_view(&self.peers[slot])
        if self.control != NULL:
            munmap(self.control, sizeof(ControlHeader))
            self.control = NULL

    def close(self):
        """Unmap every file; the data stays in the directory."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self._release()
