# The processor-bound payment body, written from the core's integers.
from libc.stdint cimport int64_t

cdef enum:
    PAYLOAD_MAX = 160  # every part at its longest fits

cdef Py_ssize_t write_payment_payload(const unsigned char* uuid, int64_t cents,
                                      int64_t requested_at_ms, char* out) noexcept nogil
