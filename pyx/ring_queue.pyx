"""A bounded FIFO ring of pending payments (UUID bytes + cents) in C memory."""
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from cpython.bytes cimport PyBytes_FromStringAndSize


cdef class RingQueue:
    """Fixed capacity, oldest first. push() answers False instead of growing:
    a full queue means the service is overloaded and must say so."""

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if <size_t>capacity > (<size_t>-1) // sizeof(PendingPayment):
            raise MemoryError(f"capacity {capacity} is too large")
        self.entries = <PendingPayment*>malloc(<size_t>capacity * sizeof(PendingPayment))
        if self.entries == NULL:
            raise MemoryError(f"cannot allocate a queue of {capacity} payments")
        self._capacity = capacity
        self.head = 0
        self.count = 0

    def __dealloc__(self):
        free(self.entries)

    cdef bint push_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil:
        cdef Py_ssize_t tail
        if self.count == self._capacity:
            return False
        tail = self.head + self.count
        if tail >= self._capacity:
            tail -= self._capacity
        memcpy(self.entries[tail].uuid, uuid16, UUID_BYTES)
        self.entries[tail].cents = cents
        self.count += 1
        return True

    cdef bint push_front_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil:
        if self.count == self._capacity:
            return False
        self.head = (self.head if self.head > 0 else self._capacity) - 1
        memcpy(self.entries[self.head].uuid, uuid16, UUID_BYTES)
        self.entries[self.head].cents = cents
        self.count += 1
        return True

    cdef bint pop_raw(self, unsigned char* uuid16_out, int64_t* cents_out) noexcept nogil:
        if self.count == 0:
            return False
        memcpy(uuid16_out, self.entries[self.head].uuid, UUID_BYTES)
        cents_out[0] = self.entries[self.head].cents
        self.head += 1
        if self.head == self._capacity:
            self.head = 0
        self.count -= 1
        return True

    def push(self, bytes uuid16 not None, int64_t cents) -> bool:
        """Append at the back; False when the queue is full."""
        return self.push_raw(checked_uuid(uuid16), cents)

    def push_front(self, bytes uuid16 not None, int64_t cents) -> bool:
        """Put at the front, to be popped next; False when the queue is full."""
        return self.push_front_raw(checked_uuid(uuid16), cents)

    def pop(self):
        """Remove and return the oldest (uuid16, cents), or None when empty."""
        cdef unsigned char uuid16[UUID_BYTES]
        cdef int64_t cents
        if not self.pop_raw(uuid16, &cents):
            return None
        return PyBytes_FromStringAndSize(<char*>uuid16, UUID_BYTES), cents

    def clear(self) -> None:
        self.head = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def is_full(self) -> bool:
        return self.count == self._capacity


cdef const unsigned char* checked_uuid(bytes uuid16) except NULL:
    if len(uuid16) != UUID_BYTES:
        raise ValueError(f"a UUID is {UUID_BYTES} bytes, got {len(uuid16)}")
    return uuid16
