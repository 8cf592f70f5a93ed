# The set of correlationIds the service has accepted, shared by every service
# instance on the host: a lock-free open-addressing hash table in a file that
# each instance maps MAP_SHARED, so a payment posted twice is processed once
# whichever instance receives it.
cimport cython
from libc.stdint cimport int64_t, uint64_t


cdef enum ClaimResult:
    ID_CLAIMED = 1     # new: the caller now owns the payment
    ID_DUPLICATE = 2   # already accepted with the same amount
    ID_CONFLICT = 3    # already accepted with a different amount
    ID_FULL = 4        # the table is three quarters used: refused


cdef struct SharedHeader:
    uint64_t magic
    uint64_t version
    uint64_t slot_count
    uint64_t generation        # bumped by purge: every older slot is free
    uint64_t padding_to_counters[4]
    # Changed by every claim: kept off the cache line that every probe reads.
    int64_t live_count         # ready slots of this generation
    int64_t retired_count      # tombstones of this generation
    uint64_t padding_to_slots[6]


cdef struct Slot:
    uint64_t tag               # generation << 2 | state
    uint64_t key_high
    uint64_t key_low
    int64_t cents


@cython.final
cdef class AcceptedIds:
    cdef SharedHeader* header  # NULL once closed
    cdef Slot* table
    cdef size_t mapped_bytes
    cdef uint64_t slot_mask
    cdef int64_t occupancy_limit

    # The C-level API: uuid16 points at 16 raw bytes. The object must be open.
    cdef ClaimResult claim_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil
    cdef bint release_raw(self, const unsigned char* uuid16) noexcept nogil
    cdef bint contains_raw(self, const unsigned char* uuid16) noexcept nogil

