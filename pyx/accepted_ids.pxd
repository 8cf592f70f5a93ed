# The idempotency window: the correlationIds accepted by any service instance on
# the host within the last window, in a file that every instance maps
# MAP_SHARED (tmpfs), claimed by compare-and-swap and never locked.
#
# File layout (little-endian, offsets in bytes):
#   0     SharedHeader
#           0     geometry: magic, version, capacity, window_ms, subtable_count,
#                 slots_per_subtable, load_limit, origin_ms; written once, under
#                 the file lock, when the file is created
#           64    epoch (int64, only ever raised, by compare-and-swap), early_advances
#           128   fill[MAX_SUBTABLES]: epoch low 32 bits << 32 | slots taken in that epoch
#           256   started[MAX_SUBTABLES]: epoch low 24 bits << 40 | ms its epoch began
#                 after origin_ms (the effective window's metric)
#           384   registry[REGISTRY_SLOTS] of instance names; a slot's index is its owner
#   4480  tags: slots_per_subtable rows of subtable_count uint64 tags; row r holds
#         the tag of slot r of every sub-table, so a key's probe paths in all of
#         them lie side by side (one stretch of memory to read per claim)
#   P     payloads, laid out as the tags (P: the first cache line after the tags)
#
# Epoch e (window_ms / (subtable_count - 1) ms long, or shorter when its
# sub-table fills first) inserts into sub-table e % subtable_count, and its ids
# count while the current epoch is within [e, e + subtable_count - 1]. A slot
# whose epoch is no longer live is free: nothing is ever cleared.
#
# Tag: epoch << 25 | fingerprint << 9 | owner << 3 | state. Epochs count from the
# one the file was made in (39 bits: 17 years of 1 ms epochs); the fingerprint,
# 16 bits of the key's hash, lets a probe pass other keys' slots without reading
# their payload. Each sub-table is open-addressed with linear probing, from row
# hash * slots_per_subtable >> 64.
cimport cython
from libc.stdint cimport int64_t, uint64_t

from paycore.core.instance_registry cimport REGISTRY_SLOTS, RegistrySlot

cdef enum:
    MAX_SUBTABLES = 16


cdef enum ClaimResult:
    ID_CLAIMED = 1      # claim: new, the caller owns it until confirm() or abandon()
    ID_DUPLICATE = 2    # claim: durable with the same amount
    ID_CONFLICT = 3     # durable (or, for remember, claimed by the caller) with another amount
    ID_IN_PROGRESS = 4  # claimed by some instance and not durable yet: ask again shortly
    ID_DURABLE = 5      # remember: durable in the current epoch with this amount


cdef struct Geometry:
    uint64_t magic
    uint64_t version
    uint64_t capacity            # ids the window must hold
    uint64_t window_ms
    uint64_t subtable_count
    uint64_t slots_per_subtable
    uint64_t load_limit          # slots one epoch may take in its sub-table
    int64_t origin_ms            # when the file was made (wall clock)


cdef struct SharedHeader:
    Geometry geometry
    # Read by every call, written once an epoch: its own cache line.
    int64_t epoch
    uint64_t early_advances      # epochs that began because their predecessor was full
    uint64_t padding_to_fill[6]
    uint64_t fill[MAX_SUBTABLES]
    uint64_t started[MAX_SUBTABLES]
    RegistrySlot registry[REGISTRY_SLOTS]


cdef struct Payload:
    uint64_t key_high
    uint64_t key_low
    int64_t cents


@cython.final
cdef class AcceptedIds:
    cdef SharedHeader* header    # NULL once closed
    cdef uint64_t* tags
    cdef Payload* payloads
    cdef size_t mapped_bytes
    cdef int64_t subtable_count
    cdef uint64_t slots_per_subtable
    cdef uint64_t load_limit
    cdef int64_t epoch_ms
    cdef int64_t origin_epoch    # the wall clock's epoch number when the file was made
    cdef uint64_t owner
    cdef int64_t fixed_now_ms    # the clock, when a test sets it; -1: the wall clock
    cdef readonly str instance

    # The C-level API: uuid16 points at 16 raw bytes. The object must be open;
    # any thread may call these without the GIL.
    cdef ClaimResult claim_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil
    cdef bint confirm_raw(self, const unsigned char* uuid16) noexcept nogil
    cdef bint abandon_raw(self, const unsigned char* uuid16) noexcept nogil
    cdef ClaimResult remember_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil
    # Raised (by the clock, or early) when a new epoch begins: whoever keeps
    # ids alive with remember_raw() does it again when this changes.
    cdef int64_t current_epoch(self) noexcept nogil
