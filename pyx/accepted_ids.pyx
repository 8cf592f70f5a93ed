"""The idempotency window: the correlationIds accepted by any service instance
on this host within the last window, in a file every instance maps MAP_SHARED.

Time is cut into epochs of window / (K - 1), K the number of sub-tables; an id
inserted in epoch e goes to sub-table e % K and is remembered while the
current epoch is within [e, e + K - 1]: for at least the window and at most
window * K / (K - 1). A slot whose epoch is not live is free, so forgetting
costs nothing. The file is sized for `capacity` ids per window; an epoch whose
sub-table fills before its time is up ends early, which shortens the window
instead of refusing payments (early_advances, effective_window_ms).

Each slot is claimed by compare-and-swap on its tag (free -> WRITING), filled,
then published as CLAIMED (the claimer has yet to make the payment durable)
or DURABLE; confirm() and abandon() move the owner's CLAIMED slot on to
DURABLE or TOMBSTONE. No lock is ever held, so a killed process cannot block
the others.

Why a key is claimed at most once while a claim of it is remembered. A claim
reads the epoch E, looks for the key in every live sub-table, inserts into
E's, publishes, and reads the epoch again: it stands only if that read still
gives E; otherwise it withdraws its slot (TOMBSTONE) and starts over. Every
access to the epoch and to the tags is sequentially consistent, so they all
fall in one total order. Take two standing claims A and B of one key, made in
epochs a <= b with b - a < K (A's is still live when B's epoch begins):
- a == b: both used the same probe path of the same sub-table. Each took the
  first slot free on it when it looked, by a compare-and-swap of the tag it
  saw; so the later one either lost that swap or saw the earlier one's slot
  (waiting while it was WRITING) and found the key: it did not insert.
- a < b: A's second read of the epoch gave a, so it came before the epoch was
  raised past a, and A's slot was written before it. B read b after that
  raise and only then looked in a's sub-table (live for b), so it found A's
  slot and did not insert.
Either way one of them is not a claim, which is the contradiction. remember()
inserts by the same steps, so it never stands beside a claim either. Without
the second read, A, reading a stale epoch a, could look in b's sub-table
before B wrote there while B looked in a's before A wrote there.
"""
import os

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_CLOEXEC, O_CREAT, O_RDWR, open as open_file
from posix.mman cimport MAP_FAILED, MAP_POPULATE, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.unistd cimport close, ftruncate, pread, pwrite

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.instance_registry cimport check_instance_name, register_instance


cdef extern from "<sys/file.h>" nogil:
    enum: LOCK_EX
    enum: LOCK_UN
    int flock(int fd, int operation)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from * nogil:
    """
    #include <stdint.h>
    /* hash * range / 2^64: a slot index in [0, range) without rounding range to a power of two. */
    static inline uint64_t accepted_ids_scale(uint64_t hash, uint64_t range) {
        return (uint64_t)(((unsigned __int128)hash * range) >> 64);
    }
    /* For a line about to be written: taken for writing at once. */
    static inline void accepted_ids_prefetch_to_write(const void *address) { __builtin_prefetch(address, 1); }
    """
    uint64_t scale_to_range "accepted_ids_scale"(uint64_t hash, uint64_t range)
    void prefetch_to_write "accepted_ids_prefetch_to_write"(const void* address)

cdef extern from * nogil:
    enum:
        ATOMIC_RELAXED "__ATOMIC_RELAXED"
        ATOMIC_SEQ_CST "__ATOMIC_SEQ_CST"
    uint64_t atomic_load "__atomic_load_n"(const uint64_t* address, int order)
    void atomic_store "__atomic_store_n"(uint64_t* address, uint64_t value, int order)
    uint64_t atomic_increment "__atomic_add_fetch"(uint64_t* address, uint64_t delta, int order)
    bint atomic_compare_exchange "__atomic_compare_exchange_n"(
        uint64_t* address, uint64_t* expected, uint64_t desired, bint weak,
        int success_order, int failure_order)
    int64_t atomic_load_signed "__atomic_load_n"(const int64_t* address, int order)
    void atomic_store_signed "__atomic_store_n"(int64_t* address, int64_t value, int order)
    bint atomic_compare_exchange_signed "__atomic_compare_exchange_n"(
        int64_t* address, int64_t* expected, int64_t desired, bint weak,
        int success_order, int failure_order)


CLAIMED = ID_CLAIMED
DUPLICATE = ID_DUPLICATE
CONFLICT = ID_CONFLICT
IN_PROGRESS = ID_IN_PROGRESS
DURABLE = ID_DURABLE

DEFAULT_SUBTABLES = 5
DEFAULT_LOAD_FACTOR = 0.75

cdef uint64_t MAGIC = 0x5445534449594150  # "PAYIDSET" in the file on little-endian hosts
cdef uint64_t FORMAT_VERSION = 2
cdef double MAX_LOAD_FACTOR = 0.9
cdef uint64_t MAX_SLOTS_PER_SUBTABLE = 0xFFFFFFFF  # fill counts are 32 bits

cdef enum SlotState:
    SLOT_EMPTY = 0
    SLOT_WRITING = 1
    SLOT_CLAIMED = 2
    SLOT_DURABLE = 3
    SLOT_TOMBSTONE = 4

cdef enum:
    STATE_MASK = 7
    OWNER_SHIFT = 3
    OWNER_MASK = 63
    FINGERPRINT_SHIFT = 9
    FINGERPRINT_MASK = 0xFFFF
    EPOCH_SHIFT = 25
    FILL_STAMP_SHIFT = 32
    START_STAMP_SHIFT = 40
    START_STAMP_MASK = 0xFFFFFF
    # Busy-wait this many reads before yielding the CPU to a writer mid-insert.
    BUSY_SPINS = 64
    CACHE_LINE = 64

cdef uint64_t FILL_COUNT_MASK = 0xFFFFFFFF
cdef uint64_t START_OFFSET_MASK = (1ULL << START_STAMP_SHIFT) - 1

# A writer fills a slot in a few nanoseconds; one that has not finished after
# this long was killed (or stalled far beyond any request's budget).
cdef int64_t STALE_WRITER_NS = 50 * 1000 * 1000

assert sizeof(SharedHeader) == 4480 and sizeof(Payload) == 24


# --- slots and keys -----------------------------------------------------------------

cdef inline uint64_t make_tag(int64_t epoch, uint64_t fingerprint, uint64_t owner,
                              SlotState state) noexcept nogil:
    return (<uint64_t>epoch << EPOCH_SHIFT) | (fingerprint << FINGERPRINT_SHIFT) | (owner << OWNER_SHIFT) | state


cdef inline SlotState tag_state(uint64_t tag) noexcept nogil:
    return <SlotState>(tag & STATE_MASK)


cdef inline uint64_t tag_owner(uint64_t tag) noexcept nogil:
    return (tag >> OWNER_SHIFT) & OWNER_MASK


cdef inline uint64_t tag_fingerprint(uint64_t tag) noexcept nogil:
    return (tag >> FINGERPRINT_SHIFT) & FINGERPRINT_MASK


cdef inline int64_t tag_epoch(uint64_t tag) noexcept nogil:
    return <int64_t>(tag >> EPOCH_SHIFT)


cdef inline uint64_t with_state(uint64_t tag, SlotState state) noexcept nogil:
    return (tag & ~<uint64_t>STATE_MASK) | state


cdef struct Key:
    uint64_t high
    uint64_t low
    uint64_t home              # the row where its probe path starts, in every sub-table
    uint64_t fingerprint       # hash bits kept in its tags: other keys' slots are passed over unread


# A slot as one look saw it.
cdef struct Entry:
    uint64_t index
    uint64_t tag
    int64_t cents


cdef enum Probe:
    PROBE_FOUND      # the key's slot in that epoch, CLAIMED or DURABLE
    PROBE_ABSENT     # not there; entry holds the first slot free in that epoch
    PROBE_STALE      # a slot of a newer epoch: the caller's epoch is out of date
    PROBE_NO_ROOM    # not there, and no slot of the path is free

cdef enum Reservation:
    RESERVED
    RESERVE_FULL     # the epoch took its load limit: time for the next one
    RESERVE_STALE    # the sub-table already counts for a newer epoch


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


cdef inline Key make_key(AcceptedIds ids, const unsigned char* uuid16) noexcept nogil:
    cdef Key key
    memcpy(&key.high, uuid16, 8)
    memcpy(&key.low, uuid16 + 8, 8)
    cdef uint64_t hash = key_hash(key.high, key.low)
    # The row comes from the hash's high bits (the multiply), the fingerprint from its low ones.
    key.home = scale_to_range(hash, ids.slots_per_subtable)
    key.fingerprint = hash & FINGERPRINT_MASK
    return key


cdef inline uint64_t column_of(AcceptedIds ids, int64_t epoch) noexcept nogil:
    """The sub-table of an epoch: a column of the table, whose rows hold one
    slot of each sub-table."""
    return <uint64_t>(epoch % ids.subtable_count)


cdef inline uint64_t previous_column(AcceptedIds ids, uint64_t column) noexcept nogil:
    return (column if column != 0 else <uint64_t>ids.subtable_count) - 1


cdef inline uint64_t index_of(AcceptedIds ids, uint64_t row, uint64_t column) noexcept nogil:
    return row * <uint64_t>ids.subtable_count + column


cdef inline int64_t oldest_live(AcceptedIds ids, int64_t epoch) noexcept nogil:
    return max(epoch - ids.subtable_count + 1, 0)


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


cdef inline int64_t wall_clock_ms() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <int64_t>now.tv_sec * 1000 + now.tv_nsec // 1000000


cdef inline int64_t now_ms(AcceptedIds ids) noexcept nogil:
    if ids.fixed_now_ms >= 0:
        return ids.fixed_now_ms
    return wall_clock_ms()


cdef inline size_t payloads_offset(const Geometry* geometry) noexcept nogil:
    cdef size_t tags_end = sizeof(SharedHeader) + geometry.subtable_count * geometry.slots_per_subtable * 8
    return (tags_end + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


cdef inline size_t file_bytes(const Geometry* geometry) noexcept nogil:
    return payloads_offset(geometry) + geometry.subtable_count * geometry.slots_per_subtable * sizeof(Payload)


cdef class AcceptedIds:
    """The correlationIds accepted within the last window_ms by every instance,
    in the shared file at path, sized for `capacity` ids per window.

    `instance` names the caller: it owns the ids it claims until it confirms
    or abandons them, and claims_of_this_instance() finds them after a crash.
    """

    def __cinit__(self):
        self.header = NULL
        self.fixed_now_ms = -1

    def __init__(self, path, str instance, Py_ssize_t capacity, Py_ssize_t window_ms, *,
                 Py_ssize_t subtables=DEFAULT_SUBTABLES, double load_factor=DEFAULT_LOAD_FACTOR):
        check_instance_name(instance)
        cdef Geometry geometry = plan_geometry(capacity, window_ms, subtables, load_factor)
        cdef bytes encoded_path = os.fsencode(path)
        cdef void* address = NULL
        cdef int owner
        cdef int fd = open_file(encoded_path, O_RDWR | O_CREAT | O_CLOEXEC, 0o666)
        if fd < 0:
            raise_os_error(path)
        try:
            # Instances starting at the same moment initialise the file and
            # register their names one at a time.
            if flock(fd, LOCK_EX) != 0:
                raise_os_error(path)
            prepare_file(fd, path, &geometry)
            # Every page mapped now: a first touch while serving costs a page
            # fault, up to half a millisecond on a VM, and ids land anywhere.
            address = mmap(NULL, file_bytes(&geometry), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)
            if address == MAP_FAILED:
                raise_os_error(path)
            owner = register_instance((<SharedHeader*>address).registry, instance)
            if owner < 0:
                munmap(address, file_bytes(&geometry))
                raise RuntimeError(f"the accepted-ids registry in {path} is full ({REGISTRY_SLOTS} instances)")
        finally:
            # Explicitly: the mapping keeps the open file, and so the lock, alive after close.
            flock(fd, LOCK_UN)
            close(fd)
        self.header = <SharedHeader*>address
        self.tags = <uint64_t*>(<char*>address + sizeof(SharedHeader))
        self.payloads = <Payload*>(<char*>address + payloads_offset(&geometry))
        self.mapped_bytes = file_bytes(&geometry)
        self.subtable_count = geometry.subtable_count
        self.slots_per_subtable = geometry.slots_per_subtable
        self.load_limit = geometry.load_limit
        self.epoch_ms = geometry.window_ms // (geometry.subtable_count - 1)
        self.origin_epoch = (<SharedHeader*>address).geometry.origin_ms // self.epoch_ms
        self.owner = owner
        self.instance = instance

    def __dealloc__(self):
        if self.header != NULL:
            munmap(self.header, self.mapped_bytes)

    # --- the C-level API ---------------------------------------------------------

    cdef int64_t current_epoch(self) noexcept nogil:
        cdef int64_t now = now_ms(self)
        cdef int64_t by_clock = now // self.epoch_ms - self.origin_epoch
        cdef int64_t seen = atomic_load_signed(&self.header.epoch, ATOMIC_SEQ_CST)
        # Only ever raised, so a clock stepping back changes nothing.
        while seen < by_clock:
            if atomic_compare_exchange_signed(&self.header.epoch, &seen, by_clock, False,
                                              ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
                record_starts(self, seen, by_clock, now)
                return by_clock
        return seen

    cdef ClaimResult claim_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil:
        cdef Key key = make_key(self, uuid16)
        return insert(self, &key, cents, False)

    cdef ClaimResult remember_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil:
        cdef Key key = make_key(self, uuid16)
        return insert(self, &key, cents, True)

    cdef bint confirm_raw(self, const unsigned char* uuid16) noexcept nogil:
        cdef Key key = make_key(self, uuid16)
        return settle_own_claim(self, &key, SLOT_DURABLE)

    cdef bint abandon_raw(self, const unsigned char* uuid16) noexcept nogil:
        cdef Key key = make_key(self, uuid16)
        return settle_own_claim(self, &key, SLOT_TOMBSTONE)

    # --- the Python API ------------------------------------------------------------

    def claim(self, bytes uuid16 not None, int64_t cents) -> int:
        """Accept the payment unless its id is known: CLAIMED (new: the caller
        owns it until it confirms or abandons it), DUPLICATE, CONFLICT (durable
        with another amount) or IN_PROGRESS (claimed, not durable yet)."""
        return self.claim_raw(checked_key(self, uuid16), cents)

    def confirm(self, bytes uuid16 not None) -> bool:
        """The caller's claim is durable: later claims get DUPLICATE or
        CONFLICT. False if the caller holds no claim of the id."""
        return self.confirm_raw(checked_key(self, uuid16))

    def abandon(self, bytes uuid16 not None) -> bool:
        """Forget the caller's claim, whose payment was not taken after all.
        False if the caller holds no claim of the id."""
        return self.abandon_raw(checked_key(self, uuid16))

    def remember(self, bytes uuid16 not None, int64_t cents) -> int:
        """Make the id durable in the current epoch, inserting it or copying
        it forward: DURABLE, CONFLICT (known with another amount) or
        IN_PROGRESS (another instance's claim, not durable yet). A claim of
        the caller's own becomes durable. Keeps an id remembered past the
        window when it is called again each time `epoch` changes."""
        return self.remember_raw(checked_key(self, uuid16), cents)

    def state(self, bytes uuid16 not None):
        """None if the id is not known; else (CLAIMED or DURABLE, cents)."""
        cdef Key key = make_key(self, checked_key(self, uuid16))
        cdef Entry found
        cdef Probe outcome
        while True:
            outcome = find_live(self, self.current_epoch(), &key, &found)
            if outcome == PROBE_STALE:
                continue
            if outcome != PROBE_FOUND:
                return None
            return (ID_DURABLE if tag_state(found.tag) == SLOT_DURABLE else ID_CLAIMED), found.cents

    def claims_of_this_instance(self) -> list:
        """The ids this instance claimed and neither confirmed nor abandoned:
        after a crash, those its journal holds are to be confirmed, the others
        abandoned. Reads the whole file."""
        checked_open(self)
        cdef int64_t epoch = self.current_epoch()
        cdef uint64_t index, tag
        cdef unsigned char uuid16[UUID_BYTES]
        claims = []
        for index in range(self.slots_per_subtable * self.subtable_count):
            tag = atomic_load(&self.tags[index], ATOMIC_SEQ_CST)
            if (tag_state(tag) == SLOT_CLAIMED and tag_owner(tag) == self.owner
                    and oldest_live(self, epoch) <= tag_epoch(tag) <= epoch):
                memcpy(uuid16, &self.payloads[index].key_high, 8)
                memcpy(uuid16 + 8, &self.payloads[index].key_low, 8)
                claims.append(PyBytes_FromStringAndSize(<char*>uuid16, UUID_BYTES))
        return claims

    def close(self) -> None:
        """Unmap the file; no thread may be using the C-level API meanwhile."""
        if self.header != NULL:
            munmap(self.header, self.mapped_bytes)
            self.header = NULL
            self.tags = NULL
            self.payloads = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- geometry and metrics ----------------------------------------------------------

    @property
    def capacity(self) -> int:
        return checked_open(self).geometry.capacity

    @property
    def window_ms(self) -> int:
        return checked_open(self).geometry.window_ms

    @property
    def epoch_ms(self) -> int:
        return self.epoch_ms

    @property
    def subtables(self) -> int:
        return self.subtable_count

    @property
    def slots(self) -> int:
        return self.subtable_count * self.slots_per_subtable

    @property
    def file_bytes(self) -> int:
        return self.mapped_bytes

    @property
    def epoch(self) -> int:
        checked_open(self)
        return self.current_epoch()

    @property
    def effective_window_ms(self) -> int:
        """How far back every accepted id is still known: the age of the
        oldest live epoch. Below window_ms only while epochs end early."""
        cdef SharedHeader* header = checked_open(self)
        cdef int64_t now = now_ms(self)
        cdef int64_t oldest = self.current_epoch() - self.subtable_count + 1
        # As the clock has it: true of every epoch up to the file's first.
        cdef int64_t started_ms = (self.origin_epoch + oldest) * self.epoch_ms
        cdef uint64_t started
        if oldest > 0:
            started = atomic_load(&header.started[oldest % self.subtable_count], ATOMIC_RELAXED)
            if started >> START_STAMP_SHIFT == (<uint64_t>oldest & START_STAMP_MASK):
                started_ms = header.geometry.origin_ms + <int64_t>(started & START_OFFSET_MASK)
        return now - min(started_ms, now)

    @property
    def early_advances(self) -> int:
        """Epochs that began before their time because the previous one's
        sub-table was full: traffic above `capacity` per window."""
        return atomic_load(&checked_open(self).early_advances, ATOMIC_RELAXED)

    @property
    def live_ids(self) -> int:
        """Slots taken in the live epochs (abandoned claims and the copies
        remember() makes included): approximate."""
        cdef SharedHeader* header = checked_open(self)
        cdef int64_t epoch = self.current_epoch()
        cdef int64_t live_epoch
        cdef uint64_t fill
        cdef uint64_t total = 0
        for live_epoch in range(oldest_live(self, epoch), epoch + 1):
            fill = atomic_load(&header.fill[live_epoch % self.subtable_count], ATOMIC_RELAXED)
            if fill >> FILL_STAMP_SHIFT == (<uint64_t>live_epoch & FILL_COUNT_MASK):
                total += fill & FILL_COUNT_MASK
        return total

    @property
    def _now_ms(self) -> int:
        """The clock, in ms since the epoch. Tests set it to hold time still
        (and None to give the wall clock back)."""
        return now_ms(self)

    @_now_ms.setter
    def _now_ms(self, value) -> None:
        self.fixed_now_ms = -1 if value is None else max(<int64_t>value, 0)


# --- inserting and finding ---------------------------------------------------------------

cdef ClaimResult insert(AcceptedIds ids, const Key* key, int64_t cents, bint durable) noexcept nogil:
    """claim() (durable False) and remember() (durable True)."""
    cdef int64_t epoch
    cdef uint64_t column
    cdef Entry found, vacant
    cdef Probe outcome
    cdef Reservation reservation
    cdef SlotState state
    cdef uint64_t writing, published
    cdef Payload* payload
    cdef bint takes_over
    while True:
        epoch = ids.current_epoch()
        column = column_of(ids, epoch)
        outcome = probe(ids, epoch, column, key, &vacant)
        if outcome == PROBE_FOUND:
            found = vacant
        elif outcome == PROBE_ABSENT:
            prefetch_to_write(&ids.payloads[vacant.index])
            outcome = find_older(ids, epoch, column, key, &found)
        if outcome == PROBE_STALE:
            continue
        if outcome == PROBE_NO_ROOM:
            advance_early(ids, epoch)
            continue

        if outcome == PROBE_FOUND:
            state = tag_state(found.tag)
            # remember() is told by the caller's journal that its own claim is durable.
            takes_over = durable and tag_owner(found.tag) == ids.owner
            if state == SLOT_CLAIMED and not takes_over:
                return ID_IN_PROGRESS
            if found.cents != cents:
                return ID_CONFLICT
            if not durable:
                return ID_DUPLICATE
            if state == SLOT_CLAIMED and not atomic_compare_exchange(
                    &ids.tags[found.index], &found.tag, with_state(found.tag, SLOT_DURABLE), False,
                    ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
                continue
            if tag_epoch(found.tag) == epoch:
                return ID_DURABLE
            # remember() of an id from an older epoch: copied to this one.

        reservation = reserve_slot(ids, epoch, column)
        if reservation == RESERVE_FULL:
            advance_early(ids, epoch)
            continue
        if reservation == RESERVE_STALE:
            continue
        writing = make_tag(epoch, key.fingerprint, ids.owner, SLOT_WRITING)
        if not atomic_compare_exchange(&ids.tags[vacant.index], &vacant.tag, writing, False,
                                       ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
            # Another process took the slot first, maybe for this very key.
            release_slot(ids, epoch, column)
            continue
        payload = &ids.payloads[vacant.index]
        atomic_store(&payload.key_high, key.high, ATOMIC_RELAXED)
        atomic_store(&payload.key_low, key.low, ATOMIC_RELAXED)
        atomic_store_signed(&payload.cents, cents, ATOMIC_RELAXED)
        published = with_state(writing, SLOT_DURABLE if durable else SLOT_CLAIMED)
        if not atomic_compare_exchange(&ids.tags[vacant.index], &writing, published, False,
                                       ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
            continue  # stalled past STALE_WRITER_NS, the slot was retired under us
        # The second read of the epoch: see the module's docstring.
        if atomic_load_signed(&ids.header.epoch, ATOMIC_SEQ_CST) == epoch:
            return ID_DURABLE if durable else ID_CLAIMED
        atomic_compare_exchange(&ids.tags[vacant.index], &published, with_state(published, SLOT_TOMBSTONE),
                                False, ATOMIC_SEQ_CST, ATOMIC_SEQ_CST)


cdef bint settle_own_claim(AcceptedIds ids, const Key* key, SlotState settled) noexcept nogil:
    cdef Entry found
    cdef Probe outcome
    while True:
        outcome = find_live(ids, ids.current_epoch(), key, &found)
        if outcome == PROBE_STALE:
            continue
        if (outcome != PROBE_FOUND or tag_state(found.tag) != SLOT_CLAIMED
                or tag_owner(found.tag) != ids.owner):
            return False
        if atomic_compare_exchange(&ids.tags[found.index], &found.tag, with_state(found.tag, settled), False,
                                   ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
            return True


cdef Probe find_live(AcceptedIds ids, int64_t epoch, const Key* key, Entry* found) noexcept nogil:
    """The key's newest entry in a live epoch: FOUND, ABSENT or STALE."""
    cdef uint64_t column = column_of(ids, epoch)
    cdef Probe outcome = probe(ids, epoch, column, key, found)
    if outcome == PROBE_ABSENT or outcome == PROBE_NO_ROOM:
        return find_older(ids, epoch, column, key, found)
    return outcome


cdef Probe find_older(AcceptedIds ids, int64_t epoch, uint64_t column, const Key* key,
                      Entry* found) noexcept nogil:
    """The key's newest entry in the live epochs before `epoch` (whose column
    is given): FOUND, ABSENT or STALE."""
    cdef int64_t older = epoch - 1
    cdef Probe outcome
    while older >= oldest_live(ids, epoch):
        column = previous_column(ids, column)
        outcome = probe(ids, older, column, key, found)
        if outcome == PROBE_FOUND or outcome == PROBE_STALE:
            return outcome
        older -= 1
    return PROBE_ABSENT


cdef Probe probe(AcceptedIds ids, int64_t epoch, uint64_t column, const Key* key,
                 Entry* entry) noexcept nogil:
    """Walk the key's probe path in the sub-table of `epoch` (tombstones are
    passed over) up to its slot of that epoch or the first slot free in it."""
    cdef uint64_t row = key.home
    cdef uint64_t probes, index, tag
    cdef Payload* payload
    for probes in range(ids.slots_per_subtable):
        index = index_of(ids, row, column)
        tag = atomic_load(&ids.tags[index], ATOMIC_SEQ_CST)
        if (tag_state(tag) == SLOT_WRITING and tag_epoch(tag) == epoch
                and tag_fingerprint(tag) == key.fingerprint):
            tag = wait_for_writer(ids, index, tag)
        if tag_epoch(tag) > epoch:
            return PROBE_STALE
        if tag_state(tag) == SLOT_EMPTY or tag_epoch(tag) < epoch:
            entry.index = index
            entry.tag = tag
            return PROBE_ABSENT
        if ((tag_state(tag) == SLOT_CLAIMED or tag_state(tag) == SLOT_DURABLE)
                and tag_fingerprint(tag) == key.fingerprint):
            payload = &ids.payloads[index]
            if (atomic_load(&payload.key_high, ATOMIC_RELAXED) == key.high
                    and atomic_load(&payload.key_low, ATOMIC_RELAXED) == key.low):
                entry.cents = atomic_load_signed(&payload.cents, ATOMIC_RELAXED)
                # The slot is only reused once its epoch is over: then so is the caller's.
                tag = atomic_load(&ids.tags[index], ATOMIC_SEQ_CST)
                if tag_epoch(tag) != epoch:
                    return PROBE_STALE
                if tag_state(tag) != SLOT_TOMBSTONE:
                    entry.index = index
                    entry.tag = tag
                    return PROBE_FOUND
        row += 1
        if row == ids.slots_per_subtable:
            row = 0
    return PROBE_NO_ROOM


cdef uint64_t wait_for_writer(AcceptedIds ids, uint64_t index, uint64_t tag) noexcept nogil:
    """The slot's tag once its writer, mid-insert of a key with the caller's
    fingerprint, is done. A writer that does not finish within
    STALE_WRITER_NS is presumed dead: its slot is retired as a tombstone, so
    nobody waits for it again. Should that writer still be alive, its
    publishing compare-and-swap fails and it starts over, which keeps each
    key claimed once."""
    cdef uint64_t* address = &ids.tags[index]
    cdef uint64_t writing = tag
    cdef int spins = 0
    cdef int64_t deadline = 0
    cdef int64_t now
    while tag == writing:
        if spins < BUSY_SPINS:
            spins += 1
        else:
            now = monotonic_ns()
            if deadline == 0:
                deadline = now + STALE_WRITER_NS
            elif now >= deadline:
                if atomic_compare_exchange(address, &tag, with_state(tag, SLOT_TOMBSTONE), False,
                                           ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
                    return with_state(tag, SLOT_TOMBSTONE)
                return tag  # the writer finished meanwhile: tag holds its new value
            sched_yield()
        tag = atomic_load(address, ATOMIC_SEQ_CST)
    return tag


# --- epochs ---------------------------------------------------------------------------------

cdef Reservation reserve_slot(AcceptedIds ids, int64_t epoch, uint64_t column) noexcept nogil:
    """Count one more slot taken in the epoch's sub-table, unless it reached
    the load limit. The count restarts when a new epoch first inserts there."""
    cdef uint64_t* fill = &ids.header.fill[column]
    cdef uint64_t stamp = <uint64_t>epoch & FILL_COUNT_MASK
    cdef uint64_t seen = atomic_load(fill, ATOMIC_RELAXED)
    cdef uint64_t desired
    while True:
        if seen >> FILL_STAMP_SHIFT == stamp:
            if seen & FILL_COUNT_MASK >= ids.load_limit:
                return RESERVE_FULL
            desired = seen + 1
        elif <int32_t>(<uint32_t>(stamp - (seen >> FILL_STAMP_SHIFT))) > 0:
            desired = (stamp << FILL_STAMP_SHIFT) | 1
        else:
            return RESERVE_STALE
        if atomic_compare_exchange(fill, &seen, desired, False, ATOMIC_RELAXED, ATOMIC_RELAXED):
            return RESERVED


cdef void release_slot(AcceptedIds ids, int64_t epoch, uint64_t column) noexcept nogil:
    """Give back a slot reserve_slot() counted and the caller did not take,
    so that lost races do not end epochs early."""
    cdef uint64_t* fill = &ids.header.fill[column]
    cdef uint64_t seen = atomic_load(fill, ATOMIC_RELAXED)
    while (seen >> FILL_STAMP_SHIFT == (<uint64_t>epoch & FILL_COUNT_MASK) and seen & FILL_COUNT_MASK != 0
           and not atomic_compare_exchange(fill, &seen, seen - 1, False, ATOMIC_RELAXED, ATOMIC_RELAXED)):
        pass


cdef void advance_early(AcceptedIds ids, int64_t epoch) noexcept nogil:
    """The epoch's sub-table is full: the next epoch begins now (unless
    another process began it already)."""
    cdef int64_t seen = epoch
    if atomic_compare_exchange_signed(&ids.header.epoch, &seen, epoch + 1, False,
                                      ATOMIC_SEQ_CST, ATOMIC_SEQ_CST):
        atomic_increment(&ids.header.early_advances, 1, ATOMIC_RELAXED)
        record_starts(ids, epoch, epoch + 1, now_ms(ids))


cdef void record_starts(AcceptedIds ids, int64_t previous, int64_t epoch, int64_t now) noexcept nogil:
    """Note when the epochs after `previous` up to `epoch` began: at their time
    by the clock, or now if that is earlier (they began early)."""
    cdef int64_t begun, offset
    cdef uint64_t* started
    cdef uint64_t seen, stamp, newer_by
    for begun in range(max(previous + 1, epoch - ids.subtable_count + 1), epoch + 1):
        started = &ids.header.started[begun % ids.subtable_count]
        stamp = <uint64_t>begun & START_STAMP_MASK
        offset = max(min(now, (ids.origin_epoch + begun) * ids.epoch_ms) - ids.header.geometry.origin_ms, 0)
        seen = atomic_load(started, ATOMIC_RELAXED)
        while True:
            # A process that fell behind must not overwrite a later epoch's start.
            newer_by = ((seen >> START_STAMP_SHIFT) - stamp) & START_STAMP_MASK
            if seen != 0 and newer_by != 0 and newer_by < (START_STAMP_MASK >> 1):
                break
            if atomic_compare_exchange(started, &seen, (stamp << START_STAMP_SHIFT) | (<uint64_t>offset & START_OFFSET_MASK),
                                       False, ATOMIC_RELAXED, ATOMIC_RELAXED):
                break


# --- the file ------------------------------------------------------------------------------

cdef Geometry plan_geometry(Py_ssize_t capacity, Py_ssize_t window_ms, Py_ssize_t subtables,
                            double load_factor) except *:
    cdef Geometry geometry
    memset(&geometry, 0, sizeof(geometry))
    if not 2 <= subtables <= MAX_SUBTABLES:
        raise ValueError(f"subtables must be between 2 and {MAX_SUBTABLES}, got {subtables}")
    if not 0 < load_factor <= MAX_LOAD_FACTOR:
        raise ValueError(f"load_factor must be in (0, {MAX_LOAD_FACTOR}], got {load_factor}")
    if window_ms < subtables - 1:
        raise ValueError(f"window_ms must be at least {subtables - 1} (1 ms per epoch), got {window_ms}")
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    # Rounded up (the arguments are C integers: -(-a // b) would round toward zero).
    cdef uint64_t load_limit = (capacity + subtables - 2) // (subtables - 1)
    cdef uint64_t load_parts_per_million = <uint64_t>(load_factor * 1_000_000 + 0.5)
    # At least one slot more than an epoch may take, so every probe ends.
    cdef uint64_t slots_per_subtable = max(
        (load_limit * 1_000_000 + load_parts_per_million - 1) // load_parts_per_million, load_limit + 1)
    if slots_per_subtable > MAX_SLOTS_PER_SUBTABLE:
        raise ValueError(f"capacity {capacity} needs {slots_per_subtable} slots per sub-table, "
                         f"more than {MAX_SLOTS_PER_SUBTABLE}")
    geometry.magic = MAGIC
    geometry.version = FORMAT_VERSION
    geometry.capacity = capacity
    geometry.window_ms = window_ms
    geometry.subtable_count = subtables
    geometry.slots_per_subtable = slots_per_subtable
    geometry.load_limit = load_limit
    return geometry


cdef SharedHeader* checked_open(AcceptedIds ids) except NULL:
    if ids.header == NULL:
        raise ValueError("AcceptedIds is closed")
    return ids.header


cdef const unsigned char* checked_key(AcceptedIds ids, bytes uuid16) except NULL:
    checked_open(ids)
    if len(uuid16) != UUID_BYTES:
        raise ValueError(f"a UUID is {UUID_BYTES} bytes, got {len(uuid16)}")
    return uuid16


cdef prepare_file(int fd, path, const Geometry* wanted):
    """Under the file lock: initialise a file that holds no table yet, or
    check that the existing one is one of ours with the wanted geometry."""
    cdef SharedHeader header
    cdef struct_stat status
    cdef size_t expected_bytes = file_bytes(wanted)
    cdef Geometry* found = &header.geometry
    memset(&header, 0, sizeof(header))
    cdef Py_ssize_t header_bytes = pread(fd, &header, sizeof(header), 0)
    if header_bytes < 0 or fstat(fd, &status) != 0:
        raise_os_error(path)
    if is_all_zero(&header, sizeof(header)):
        # New, or its creator died before writing the header: nothing to keep.
        header.geometry = wanted[0]
        header.geometry.origin_ms = wall_clock_ms()
        if (ftruncate(fd, 0) != 0 or ftruncate(fd, expected_bytes) != 0
                or pwrite(fd, &header, sizeof(header), 0) != sizeof(header)):
            raise_os_error(path)
        return
    if <size_t>header_bytes < sizeof(Geometry) or found.magic != MAGIC:
        raise ValueError(f"{path!r} is not an accepted-ids file")
    if found.version != FORMAT_VERSION:
        raise ValueError(f"{path!r} has format version {found.version}, "
                         f"this build reads version {FORMAT_VERSION}: remove the file")
    if (found.capacity != wanted.capacity or found.window_ms != wanted.window_ms
            or found.subtable_count != wanted.subtable_count
            or found.slots_per_subtable != wanted.slots_per_subtable):
        raise ValueError(
            f"{path!r} holds {found.capacity} ids per {found.window_ms} ms window in "
            f"{found.subtable_count} sub-tables of {found.slots_per_subtable} slots, not "
            f"{wanted.capacity} per {wanted.window_ms} ms in {wanted.subtable_count} of "
            f"{wanted.slots_per_subtable}: remove the file to change them")
    if <size_t>status.st_size != expected_bytes:
        raise ValueError(f"{path!r} is {status.st_size} bytes, its geometry takes {expected_bytes}")


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
