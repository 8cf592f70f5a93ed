# GET /payments-summary on the wire: the query's time bounds in, the JSON body out.
from libc.stdint cimport int64_t


cdef struct Bound:
    bint given                 # the parameter is present and not empty
    int64_t ms


# Longest body write_summary_body writes: the JSON text around four numbers,
# each at most CENTS_TEXT_MAX (amount.pxd) long.
cdef enum:
    SUMMARY_BODY_MAX = 192

cdef enum:
    INVALID_BOUND = -1
    NO_MEMORY = -2


cdef int parse_range(const unsigned char* query, Py_ssize_t length,
                     Bound* lower, Bound* upper) noexcept
cdef Py_ssize_t write_summary_body(int64_t default_count, int64_t default_cents,
                                   int64_t fallback_count, int64_t fallback_cents,
                                   char* out) noexcept nogil
