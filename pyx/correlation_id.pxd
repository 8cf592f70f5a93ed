# correlationId: UUID text (8-4-4-4-12 hex digits) <-> 16 raw bytes.
# Inline so the request parser and the processor wire encoder compile it in.

cdef enum:
    UUID_TEXT_LENGTH = 36
    UUID_BYTES = 16


cdef inline int hex_digit_value(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef inline bint parse_uuid(const unsigned char* text, Py_ssize_t length,
                            unsigned char* out) noexcept nogil:
    """Read canonical UUID text, either case, into 16 bytes; False if it is not one."""
    cdef Py_ssize_t i = 0
    cdef int byte_index = 0
    cdef int high, low
    if length != UUID_TEXT_LENGTH:
        return False
    while i < UUID_TEXT_LENGTH:
        if i == 8 or i == 13 or i == 18 or i == 23:
            if text[i] != 45:  # '-'
                return False
            i += 1
            continue
        high = hex_digit_value(text[i])
        low = hex_digit_value(text[i + 1])
        if high < 0 or low < 0:
            return False
        out[byte_index] = <unsigned char>((high << 4) | low)
        byte_index += 1
        i += 2
    return True


cdef inline void format_uuid(const unsigned char* uuid, char* out) noexcept nogil:
    """Write 16 bytes as lowercase canonical UUID text (UUID_TEXT_LENGTH bytes)."""
    cdef const char* digits = b"0123456789abcdef"
    cdef int byte_index
    cdef Py_ssize_t at = 0
    for byte_index in range(UUID_BYTES):
        if byte_index == 4 or byte_index == 6 or byte_index == 8 or byte_index == 10:
            out[at] = 45
            at += 1
        out[at] = digits[uuid[byte_index] >> 4]
        out[at + 1] = digits[uuid[byte_index] & 15]
        at += 2
