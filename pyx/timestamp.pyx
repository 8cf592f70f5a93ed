"""ISO-8601 UTC text <-> integer milliseconds since the epoch."""
from libc.stdint cimport int64_t

from cpython.bytes cimport PyBytes_FromStringAndSize


def format_timestamp(int64_t ms) -> str:
    """Return ms as "YYYY-MM-DDTHH:MM:SS.mmmZ"."""
    cdef char buffer[ISO_MS_LENGTH]
    format_iso_ms(ms, buffer)
    return PyBytes_FromStringAndSize(buffer, ISO_MS_LENGTH).decode("ascii")


def parse_timestamp(text, bint round_up=False) -> int:
    """Return the ms of an ISO-8601 timestamp (str or bytes); ValueError if it is not one.

    Sub-millisecond digits round down, or up with round_up (for a lower bound).
    """
    cdef bytes raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    cdef int64_t ms = 0
    if parse_iso(raw, len(raw), round_up, &ms) != 0:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    return ms
