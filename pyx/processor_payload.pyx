"""The JSON body of POST /payments to a processor, written straight from the core's
integers: correlationId from 16 bytes, amount from cents, requestedAt from ms."""
from libc.stdint cimport int64_t
from libc.string cimport memcpy

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from paycore.core.amount cimport format_cents
from paycore.core.correlation_id cimport UUID_BYTES, UUID_TEXT_LENGTH, format_uuid
from paycore.core.timestamp cimport format_iso_ms

cdef inline Py_ssize_t _append(char* out, Py_ssize_t at, const char* text,
                               Py_ssize_t length) noexcept nogil:
    memcpy(out + at, text, length)
    return at + length


cdef Py_ssize_t write_payment_payload(const unsigned char* uuid, int64_t cents,
                                      int64_t requested_at_ms, char* out) noexcept nogil:
    cdef Py_ssize_t at = _append(out, 0, b'{"correlationId":"', 18)
    format_uuid(uuid, out + at)
    at += UUID_TEXT_LENGTH
    at = _append(out, at, b'","amount":', 11)
    at += format_cents(cents, out + at)
    at = _append(out, at, b',"requestedAt":"', 16)
    at += format_iso_ms(requested_at_ms, out + at)
    return _append(out, at, b'"}', 2)


def encode_payment(bytes uuid16, int64_t cents, int64_t requested_at_ms) -> bytes:
    """Return {"correlationId":"...","amount":20.05,"requestedAt":"...Z"} as bytes."""
    cdef char out[PAYLOAD_MAX]
    if len(uuid16) != UUID_BYTES:
        raise ValueError("a UUID is 16 bytes")
    return PyBytes_FromStringAndSize(
        out, write_payment_payload(<const unsigned char*>PyBytes_AS_STRING(uuid16),
                                   cents, requested_at_ms, out))
