# The names of the instances that use a file shared by every instance on a host
# (the ledger's control file, the accepted-ids file): one slot per name, found
# again at each start, so an instance keeps its index for the life of the file.
# Inline: no module of its own.
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

cdef extern from * nogil:
    """
    #include <stdint.h>
    static inline void registry_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    void registry_store_release(uint64_t* pointer, uint64_t value)

cdef enum:
    REGISTRY_SLOTS = 64
    INSTANCE_NAME_MAX = 56


cdef struct RegistrySlot:
    uint64_t name_length       # 0 while free; stored last, with release
    char name[INSTANCE_NAME_MAX]


cdef inline int check_instance_name(str instance) except -1:
    cdef str letters_and_digits = instance.replace("_", "a").replace(".", "a").replace("-", "a")
    if not (len(instance) <= INSTANCE_NAME_MAX and instance.isascii() and letters_and_digits.isalnum()):
        raise ValueError(f"instance name must be 1-{INSTANCE_NAME_MAX} of [A-Za-z0-9_.-]: {instance!r}")
    return 0


cdef inline int register_instance(RegistrySlot* slots, str instance) except -2:
    """The index of `instance` in the registry, taking a free slot for a new
    name; -1 when every slot holds another name. The caller holds the file's
    lock, so two instances never take the same slot."""
    cdef bytes name = instance.encode("ascii")
    return register_name(slots, name, len(name))


cdef inline int register_name(RegistrySlot* slots, const char* name, size_t length) noexcept nogil:
    """register_instance for a name already checked and encoded (at most
    INSTANCE_NAME_MAX bytes)."""
    cdef RegistrySlot* entry
    cdef int slot
    for slot in range(REGISTRY_SLOTS):
        entry = &slots[slot]
        if entry.name_length == 0:
            memcpy(entry.name, name, length)
            registry_store_release(&entry.name_length, length)
        elif entry.name_length != <uint64_t>length or memcmp(entry.name, name, length) != 0:
            continue
        return slot
    return -1


cdef inline str slot_name(const RegistrySlot* slot):
    """The name a taken slot holds."""
    return slot.name[:slot.name_length].decode("ascii")
