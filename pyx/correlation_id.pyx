"""correlationId text <-> the 16 raw bytes the core keeps."""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


def uuid_to_bytes(text) -> bytes:
    """Return the 16 bytes of canonical UUID text (str or bytes); ValueError if it is not one."""
    cdef bytes raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, UUID_BYTES)
    if not parse_uuid(raw, len(raw), <unsigned char*>PyBytes_AS_STRING(out)):
        raise ValueError(f"not a UUID: {text!r}")
    return out


def uuid_to_text(bytes uuid16) -> str:
    """Return 16 bytes as lowercase canonical UUID text."""
    cdef char buffer[UUID_TEXT_LENGTH]
    if len(uuid16) != UUID_BYTES:
        raise ValueError("a UUID is 16 bytes")
    format_uuid(<const unsigned char*>PyBytes_AS_STRING(uuid16), buffer)
    return PyBytes_FromStringAndSize(buffer, UUID_TEXT_LENGTH).decode("ascii")
