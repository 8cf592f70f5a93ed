"""GET /payments-summary on the wire: the query's from/to bounds in, the JSON
body out. One compiled call each way: the summary is asked rarely, so its path
is cold when it is asked, and a cold Python path costs tens of microseconds."""
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t
from libc.stdio cimport snprintf

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from paycore.core.amount cimport CENTS_TEXT_MAX, format_cents
from paycore.core.timestamp cimport parse_iso


cdef inline int hex_digit(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20  # lower case
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef Py_ssize_t percent_decode(const unsigned char* text, Py_ssize_t length,
                               unsigned char* out) noexcept nogil:
    """%XX becomes its byte; anything else stays as it is, '+' included: in a
    UTC offset it is literal. out must hold length bytes."""
    cdef Py_ssize_t read = 0
    cdef Py_ssize_t written = 0
    cdef int high, low
    while read < length:
        if text[read] == 37 and read + 2 < length:  # '%'
            high = hex_digit(text[read + 1])
            low = hex_digit(text[read + 2])
            if high >= 0 and low >= 0:
                out[written] = <unsigned char>(high * 16 + low)
                written += 1
                read += 3
                continue
        out[written] = text[read]
        written += 1
        read += 1
    return written


cdef int parse_bound(const unsigned char* value, Py_ssize_t length, bint round_up,
                     unsigned char* scratch, Bound* bound) noexcept nogil:
    bound.given = length > 0
    if not bound.given:
        return 0
    return parse_iso(scratch, percent_decode(value, length, scratch), round_up, &bound.ms)


cdef int parse_range(const unsigned char* query, Py_ssize_t length,
                     Bound* lower, Bound* upper) noexcept:
    """Read from= and to= out of a query string (the last of each counts; other
    parameters are ignored). Inclusive bounds at millisecond precision: a lower
    bound with finer digits starts at the next millisecond, an upper one ends
    at its own. Returns 0, INVALID_BOUND if a bound given is not an ISO-8601
    time, or NO_MEMORY."""
    cdef const unsigned char* lower_text = NULL
    cdef const unsigned char* upper_text = NULL
    cdef Py_ssize_t lower_length = 0, upper_length = 0
    cdef Py_ssize_t start = 0, end, name_end, value_start
    cdef unsigned char* scratch
    cdef int outcome
    while start <= length:
        end = start
        while end < length and query[end] != 38:  # '&'
            end += 1
        name_end = start
        while name_end < end and query[name_end] != 61:  # '='
            name_end += 1
        value_start = name_end + 1 if name_end < end else end
        if name_end - start == 4 and query[start] == 102 and query[start + 1] == 114 \
                and query[start + 2] == 111 and query[start + 3] == 109:  # from
            lower_text, lower_length = query + value_start, end - value_start
        elif name_end - start == 2 and query[start] == 116 and query[start + 1] == 111:  # to
            upper_text, upper_length = query + value_start, end - value_start
        start = end + 1
    # Decoding only shrinks text: the longer value's length is room enough.
    scratch = <unsigned char*>PyMem_Malloc(max(lower_length, upper_length, 1))
    if scratch == NULL:
        return NO_MEMORY
    outcome = (parse_bound(lower_text, lower_length, True, scratch, lower)
               or parse_bound(upper_text, upper_length, False, scratch, upper))
    PyMem_Free(scratch)
    return INVALID_BOUND if outcome else 0


cdef Py_ssize_t write_summary_body(int64_t default_count, int64_t default_cents,
                                   int64_t fallback_count, int64_t fallback_cents,
                                   char* out) noexcept nogil:
    """The summary's JSON into out (SUMMARY_BODY_MAX bytes); returns its length."""
    cdef char default_amount[CENTS_TEXT_MAX + 1]
    cdef char fallback_amount[CENTS_TEXT_MAX + 1]
    default_amount[format_cents(default_cents, default_amount)] = 0
    fallback_amount[format_cents(fallback_cents, fallback_amount)] = 0
    return snprintf(out, SUMMARY_BODY_MAX,
                    b'{"default":{"totalRequests":%lld,"totalAmount":%s},'
                    b'"fallback":{"totalRequests":%lld,"totalAmount":%s}}',
                    <long long>default_count, default_amount,
                    <long long>fallback_count, fallback_amount)


def summary_range(bytes query) -> tuple:
    """(from_ms, to_ms) of a summary's query string, such as b"from=...&to=...";
    None for a bound not given or empty. ValueError if one is not an ISO-8601 time."""
    cdef Bound lower, upper
    cdef int outcome = parse_range(<const unsigned char*>PyBytes_AS_STRING(query),
                                   PyBytes_GET_SIZE(query), &lower, &upper)
    if outcome == NO_MEMORY:
        raise MemoryError()
    if outcome == INVALID_BOUND:
        raise ValueError("from and to must be ISO-8601 timestamps")
    return (lower.ms if lower.given else None, upper.ms if upper.given else None)


def summary_body(tuple totals) -> bytes:
    """The JSON body of (default_count, default_cents, fallback_count, fallback_cents):
    integers of any size, each amount written exactly."""
    cdef char body[SUMMARY_BODY_MAX]
    cdef Py_ssize_t length
    if all(INT64_MIN <= total <= INT64_MAX for total in totals):
        length = write_summary_body(totals[0], totals[1], totals[2], totals[3], body)
        return PyBytes_FromStringAndSize(body, length)
    # Past 92 million million cents: no machine word holds it, Python's integers do.
    default_count, default_cents, fallback_count, fallback_cents = totals
    return (f'{{"default":{{"totalRequests":{default_count},"totalAmount":{_amount_text(default_cents)}}},'
            f'"fallback":{{"totalRequests":{fallback_count},"totalAmount":{_amount_text(fallback_cents)}}}}}'
            ).encode()


def _amount_text(cents: int) -> str:
    whole, fraction = divmod(abs(cents), 100)
    return f"{'-' if cents < 0 else ''}{whole}.{fraction:02d}"
