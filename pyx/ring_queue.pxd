# A bounded FIFO of pending payments held in C memory: no Python object per
# entry, so a full queue costs the garbage collector nothing.
cimport cython
from libc.stdint cimport int64_t

from paycore.core.correlation_id cimport UUID_BYTES


cdef struct PendingPayment:
    unsigned char uuid[UUID_BYTES]
    int64_t cents


@cython.final
cdef class RingQueue:
    cdef PendingPayment* entries
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t head      # index of the oldest entry
    cdef Py_ssize_t count

    # The C-level API: uuid16 points at UUID_BYTES raw bytes.
    cdef bint push_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil
    cdef bint push_front_raw(self, const unsigned char* uuid16, int64_t cents) noexcept nogil
    # Copies the oldest entry out and removes it; False when empty.
    cdef bint pop_raw(self, unsigned char* uuid16_out, int64_t* cents_out) noexcept nogil
