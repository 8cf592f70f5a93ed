# The ledger's tail, shared by every service instance on a host: the
# settlements the payments record (SQLite) has not committed yet, so that a
# summary counts a payment the moment its processor's answer arrives.
#
# Files in the shared directory (a tmpfs in production):
#   ledger-tail-control.shm          ControlHeader: the purge generation and the
#                                    registry of instances
#   ledger-tail-<instance>.shm       TailHeader, then a ring of TailEntry
#
# Each ring has one writer, its instance, and any number of readers. Entries
# are numbered by two counters that only grow: the writer fills entry `tail`
# and then publishes tail + 1 (release), and drops committed entries by
# publishing a larger `head`. A reader copies [head, tail) and then reads head
# again: entries below the new head may have been overwritten and are left
# out (the payments record holds them by then); the others were not, because
# a slot is reused only once head has passed it. No lock, and a writer killed
# mid-append leaves an entry nobody sees.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from paycore.core.instance_registry cimport REGISTRY_SLOTS, RegistrySlot


cdef struct TailEntry:
    uint64_t seq               # the settlement's journal sequence number
    int64_t requested_at_ms
    int64_t cents
    uint32_t generation        # the purge generation it counts in
    uint8_t processor
    uint8_t reserved[3]


cdef struct TailHeader:
    uint64_t magic
    uint32_t version
    uint32_t entry_size
    int64_t capacity
    uint64_t padding_to_head[5]
    uint64_t head              # entries below it are dropped (64-byte lines apart: one writer, many readers)
    uint64_t padding_to_tail[7]
    uint64_t tail              # entries below it are published
    uint64_t padding_to_entries[7]


cdef struct ControlHeader:
    uint64_t magic
    uint32_t version
    uint32_t slot_count
    uint64_t generation        # raised by every purge
    uint64_t reserved[5]
    RegistrySlot slots[REGISTRY_SLOTS]


cdef struct RingView:
    int fd
    char* base
    size_t mapped_size


# A copy of every ring's unpublished-to-the-record entries, taken at one moment.
cdef struct CopiedRing:
    TailEntry* entries
    Py_ssize_t count
    int slot                   # the instance's registry slot


cdef class LedgerTail:
    cdef ControlHeader* control
    cdef RingView own
    cdef RingView peers[REGISTRY_SLOTS]
    cdef int own_slot
    cdef int64_t capacity
    cdef readonly str directory
    cdef readonly str instance

    cdef RingView* _peer(self, int slot) except? NULL
