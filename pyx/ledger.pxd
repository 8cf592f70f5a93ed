# The payment ledger shared by every service instance on a host.
#
# Files in the ledger directory (a tmpfs in production):
#   ledger-control.shm           ControlHeader: purge generation + registry of regions
#   ledger-region-<instance>.shm RegionHeader at offset 0, LedgerNode array at NODES_OFFSET
#
# Each region is a treap keyed by requestedAt (ms since the epoch), written only
# by the process that owns it and read by all under a seqlock. Nodes link by
# index, never by pointer, so every process can map the file anywhere.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from paycore.core.instance_registry cimport REGISTRY_SLOTS, RegistrySlot

cdef enum:
    PROCESSOR_COUNT = 2        # 0 = default, 1 = fallback
    NODES_OFFSET = 128         # RegionHeader padded so nodes start cache-line aligned
    NIL = -1                   # the empty link / no pending record


cdef struct Totals:
    int64_t count[PROCESSOR_COUNT]
    int64_t cents[PROCESSOR_COUNT]


cdef struct LedgerNode:
    int64_t key                # requestedAt in ms
    Totals own                 # payments with exactly this key
    Totals subtree             # own + both children's subtrees
    int32_t left
    int32_t right
    uint32_t priority          # a hash of key: the tree shape depends only on the key set
    uint32_t reserved


# The record being written, stored before the seqlock turns odd. A writer
# killed inside the write section leaves it behind; the next owner redoes it
# (it holds after-values, so redoing is idempotent) and rebuilds the links.
cdef struct PendingRecord:
    int32_t node_index         # NIL when nothing is pending
    uint8_t processor
    uint8_t new_node           # node_index is a fresh node for key
    uint8_t resets_region      # the region was stale: empty it and adopt generation first
    uint8_t reserved
    int64_t key
    int64_t count_after        # own.count[processor] of node_index once recorded
    int64_t cents_after
    int64_t node_count_after
    uint64_t generation


cdef struct RegionHeader:
    uint64_t magic             # offset 0
    uint32_t version           # 8
    uint32_t node_size         # 12
    uint64_t sequence          # 16: seqlock, odd while the owner writes
    uint64_t generation        # 24: the purge generation the contents belong to
    int64_t capacity           # 32: nodes the file holds
    int64_t node_count         # 40: nodes in use, indices [0, node_count)
    int32_t root               # 48
    int32_t reserved           # 52
    PendingRecord pending      # 56


cdef struct ControlHeader:
    uint64_t magic
    uint32_t version
    uint32_t slot_count
    uint64_t generation        # incremented by every purge
    uint64_t reserved[5]
    RegistrySlot slots[REGISTRY_SLOTS]


# One mapping of a region file: the owner's (writable) or a peer's (read-only).
cdef struct RegionView:
    int fd
    char* base
    size_t mapped_size
    int64_t mapped_capacity    # nodes covered by the mapping


# One payment handed to Ledger.restore().
cdef struct RestoredPayment:
    int64_t requested_at_ms
    int64_t cents
    int processor


cdef struct RangeQuery:
    int64_t first_key          # inclusive bounds; unbounded ends are INT64_MIN / INT64_MAX
    int64_t last_key


cdef class Ledger:
    cdef ControlHeader* control
    cdef RegionView own
    cdef RegionView peers[REGISTRY_SLOTS]
    cdef int own_slot
    cdef readonly str directory
    cdef readonly str instance

    cdef int record_payment(self, int processor, int64_t requested_at_ms, int64_t cents) except -1
    cdef int add_global_totals(self, const RangeQuery* query, Totals* out) except -1
    cdef int add_local_totals(self, const RangeQuery* query, Totals* out) except -1

    # internal
    cdef str _region_path(self, str instance)
    cdef tuple _summary(self, object from_ms, object to_ms, bint every_region)
    cdef str _slot_path(self, int slot)
    cdef int _map_control(self, int fd, str path) except -1
    cdef int _open_own_region(self, int64_t initial_capacity) except -1
    cdef void _recover(self) noexcept nogil
    cdef int _register(self) except -1
    cdef int _open_peer(self, int slot) except -1
    cdef int _ensure_open(self) except -1
    cdef int _grow(self) except -1
    cdef int _add_region_totals(self, RegionView* view, int slot, uint64_t generation,
                                const RangeQuery* query, Totals* out) except -1
    cdef int _remap_peer(self, RegionView* view, int slot) except -1
    cdef void _release(self) noexcept nogil
