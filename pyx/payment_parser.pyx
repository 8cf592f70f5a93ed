"""Parse and validate the body of POST /payments in one pass over the bytes."""
from libc.stdint cimport int64_t
from libc.string cimport memcmp

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from paycore.core.amount cimport (
    AMOUNT_NOT_POSITIVE, AMOUNT_OK, AMOUNT_SYNTAX, AMOUNT_TOO_LARGE, AmountStatus, parse_cents,
)
from paycore.core.correlation_id cimport UUID_BYTES, hex_digit_value, parse_uuid

cdef enum:
    MAX_NESTING = 32
    # Longest decoded string the parser compares: field names and the UUID.
    SHORT_TEXT = 64


cdef inline Py_ssize_t _skip_space(const unsigned char* text, Py_ssize_t at,
                                   Py_ssize_t length) noexcept nogil:
    while at < length and (text[at] == 32 or text[at] == 10 or text[at] == 13 or text[at] == 9):
        at += 1
    return at


cdef Py_ssize_t _utf8_sequence(const unsigned char* text, Py_ssize_t at,
                               Py_ssize_t length) noexcept nogil:
    """Length of the well-formed UTF-8 sequence at text[at] (lead byte >= 0x80), or -1."""
    cdef unsigned char lead = text[at]
    cdef Py_ssize_t size, i
    cdef unsigned char low = 0x80, high = 0xBF
    if 0xC2 <= lead <= 0xDF:
        size = 2
    elif 0xE0 <= lead <= 0xEF:
        size = 3
        if lead == 0xE0:
            low = 0xA0
        elif lead == 0xED:
            high = 0x9F  # no UTF-16 surrogates
    elif 0xF0 <= lead <= 0xF4:
        size = 4
        if lead == 0xF0:
            low = 0x90
        elif lead == 0xF4:
            high = 0x8F
    else:
        return -1
    if at + size > length:
        return -1
    if not (low <= text[at + 1] <= high):
        return -1
    for i in range(2, size):
        if not (0x80 <= text[at + i] <= 0xBF):
            return -1
    return size


cdef Py_ssize_t _scan_string(const unsigned char* text, Py_ssize_t at, Py_ssize_t length,
                             bint* escaped) noexcept nogil:
    """text[at] is the opening quote. Returns the index of the closing quote, or -1."""
    cdef Py_ssize_t size
    cdef int i
    cdef unsigned char c
    escaped[0] = False
    at += 1
    while at < length:
        c = text[at]
        if c == 34:  # '"'
            return at
        if c < 0x20:
            return -1
        if c == 92:  # '\\'
            escaped[0] = True
            if at + 1 >= length:
                return -1
            c = text[at + 1]
            if c == 117:  # 'u'
                if at + 6 > length:
                    return -1
                for i in range(2, 6):
                    if hex_digit_value(text[at + i]) < 0:
                        return -1
                at += 6
            elif _simple_escape(c) >= 0:
                at += 2
            else:
                return -1
        elif c >= 0x80:
            size = _utf8_sequence(text, at, length)
            if size < 0:
                return -1
            at += size
        else:
            at += 1
    return -1


cdef inline int _simple_escape(unsigned char c) noexcept nogil:
    """The byte a one-letter JSON escape stands for, or -1."""
    if c == 34 or c == 92 or c == 47:
        return c
    if c == 98:
        return 8
    if c == 102:
        return 12
    if c == 110:
        return 10
    if c == 114:
        return 13
    if c == 116:
        return 9
    return -1


cdef Py_ssize_t _decode_short(const unsigned char* text, Py_ssize_t start, Py_ssize_t end,
                              unsigned char* out) noexcept nogil:
    """Decode the escapes of a scanned string body into out (SHORT_TEXT bytes).
    Returns the decoded length, or -1 when it would not fit (it then matches
    no field name and no UUID)."""
    cdef Py_ssize_t length = 0
    cdef unsigned int code
    cdef unsigned char c
    while start < end:
        if length + 4 > SHORT_TEXT:
            return -1
        c = text[start]
        if c != 92:
            out[length] = c
            length += 1
            start += 1
            continue
        c = text[start + 1]
        start += 2
        if c != 117:
            out[length] = <unsigned char>_simple_escape(c)
            length += 1
            continue
        code = ((hex_digit_value(text[start]) << 12) | (hex_digit_value(text[start + 1]) << 8)
                | (hex_digit_value(text[start + 2]) << 4) | hex_digit_value(text[start + 3]))
        start += 4
        # Field names and UUIDs are ASCII: any other code point just has to
        # differ from them, so it is written as a byte that no match accepts.
        out[length] = <unsigned char>code if code < 0x80 else 0xFF
        length += 1
    return length


cdef Py_ssize_t _skip_number(const unsigned char* text, Py_ssize_t at,
                             Py_ssize_t length) noexcept nogil:
    """Index just past the JSON number at text[at], or -1."""
    cdef Py_ssize_t end = at
    cdef int64_t unused
    cdef unsigned char c
    while end < length:
        c = text[end]
        if not (48 <= c <= 57 or c == 45 or c == 43 or c == 46 or c == 101 or c == 69):
            break
        end += 1
    if parse_cents(text + at, end - at, &unused) == AMOUNT_SYNTAX:
        return -1
    return end


cdef Py_ssize_t _skip_value(const unsigned char* text, Py_ssize_t at, Py_ssize_t length,
                            int depth) noexcept nogil:
    """Index just past the JSON value at text[at] (no leading space), or -1."""
    cdef bint escaped
    cdef unsigned char c
    if at >= length or depth > MAX_NESTING:
        return -1
    c = text[at]
    if c == 34:
        at = _scan_string(text, at, length, &escaped)
        return -1 if at < 0 else at + 1
    if c == 123 or c == 91:  # '{' '['
        return _skip_container(text, at, length, depth)
    if c == 116:
        return at + 4 if at + 4 <= length and memcmp(text + at, b"true", 4) == 0 else -1
    if c == 102:
        return at + 5 if at + 5 <= length and memcmp(text + at, b"false", 5) == 0 else -1
    if c == 110:
        return at + 4 if at + 4 <= length and memcmp(text + at, b"null", 4) == 0 else -1
    return _skip_number(text, at, length)


cdef Py_ssize_t _skip_container(const unsigned char* text, Py_ssize_t at, Py_ssize_t length,
                                int depth) noexcept nogil:
    cdef unsigned char close = 125 if text[at] == 123 else 93
    cdef bint is_object = text[at] == 123
    cdef bint escaped
    at = _skip_space(text, at + 1, length)
    if at < length and text[at] == close:
        return at + 1
    while True:
        if is_object:
            if at >= length or text[at] != 34:
                return -1
            at = _scan_string(text, at, length, &escaped)
            if at < 0:
                return -1
            at = _skip_space(text, at + 1, length)
            if at >= length or text[at] != 58:  # ':'
                return -1
            at = _skip_space(text, at + 1, length)
        at = _skip_value(text, at, length, depth + 1)
        if at < 0:
            return -1
        at = _skip_space(text, at, length)
        if at >= length:
            return -1
        if text[at] == close:
            return at + 1
        if text[at] != 44:  # ','
            return -1
        at = _skip_space(text, at + 1, length)


cdef inline bint _same(const unsigned char* text, Py_ssize_t length, const char* name,
                       Py_ssize_t name_length) noexcept nogil:
    return length == name_length and memcmp(text, name, name_length) == 0


cdef PaymentStatus _amount_status(AmountStatus status) noexcept nogil:
    if status == AMOUNT_NOT_POSITIVE:
        return PAYMENT_AMOUNT_NOT_POSITIVE
    if status == AMOUNT_TOO_LARGE:
        return PAYMENT_AMOUNT_TOO_LARGE
    return PAYMENT_AMOUNT_TOO_PRECISE


cdef PaymentStatus parse_payment_body(const unsigned char* body, Py_ssize_t length,
                                      unsigned char* uuid_out, int64_t* cents_out) noexcept nogil:
    cdef unsigned char decoded[SHORT_TEXT]
    cdef const unsigned char* name
    cdef Py_ssize_t name_length, value_end, string_end
    cdef Py_ssize_t at = _skip_space(body, 0, length)
    cdef bint escaped
    cdef bint has_id = False, has_amount = False
    # The first field error is kept while reading on: malformed JSON anywhere
    # in the body still wins, as a 400.
    cdef PaymentStatus field_error = PAYMENT_OK
    cdef AmountStatus amount_status

    if at >= length or body[at] != 123:
        at = _skip_value(body, at, length, 0)
        if at < 0 or _skip_space(body, at, length) != length:
            return PAYMENT_MALFORMED_JSON
        return PAYMENT_NOT_AN_OBJECT
    at = _skip_space(body, at + 1, length)
    if at < length and body[at] == 125:
        at += 1
    else:
        while True:
            if at >= length or body[at] != 34:
                return PAYMENT_MALFORMED_JSON
            string_end = _scan_string(body, at, length, &escaped)
            if string_end < 0:
                return PAYMENT_MALFORMED_JSON
            name = body + at + 1
            name_length = string_end - at - 1
            if escaped:
                name_length = _decode_short(body, at + 1, string_end, decoded)
                name = decoded
            at = _skip_space(body, string_end + 1, length)
            if at >= length or body[at] != 58:
                return PAYMENT_MALFORMED_JSON
            at = _skip_space(body, at + 1, length)
            value_end = _skip_value(body, at, length, 1)
            if value_end < 0:
                return PAYMENT_MALFORMED_JSON

            if _same(name, name_length, b"correlationId", 13):
                if has_id and field_error == PAYMENT_OK:
                    field_error = PAYMENT_DUPLICATE_FIELD
                has_id = True
                if body[at] != 34:
                    if field_error == PAYMENT_OK:
                        field_error = PAYMENT_BAD_CORRELATION_ID
                elif not parse_uuid(body + at + 1, value_end - at - 2, uuid_out):
                    _scan_string(body, at, length, &escaped)
                    if not (escaped and parse_uuid(
                            decoded, _decode_short(body, at + 1, value_end - 1, decoded), uuid_out)):
                        if field_error == PAYMENT_OK:
                            field_error = PAYMENT_BAD_CORRELATION_ID
            elif _same(name, name_length, b"amount", 6):
                if has_amount and field_error == PAYMENT_OK:
                    field_error = PAYMENT_DUPLICATE_FIELD
                has_amount = True
                amount_status = parse_cents(body + at, value_end - at, cents_out)
                if field_error == PAYMENT_OK:
                    if amount_status == AMOUNT_SYNTAX:
                        field_error = PAYMENT_AMOUNT_NOT_A_NUMBER
                    elif amount_status != AMOUNT_OK:
                        field_error = _amount_status(amount_status)

            at = _skip_space(body, value_end, length)
            if at >= length:
                return PAYMENT_MALFORMED_JSON
            if body[at] == 125:
                at += 1
                break
            if body[at] != 44:
                return PAYMENT_MALFORMED_JSON
            at = _skip_space(body, at + 1, length)
    if _skip_space(body, at, length) != length:
        return PAYMENT_MALFORMED_JSON
    if field_error != PAYMENT_OK:
        return field_error
    if not has_id:
        return PAYMENT_MISSING_CORRELATION_ID
    if not has_amount:
        return PAYMENT_MISSING_AMOUNT
    return PAYMENT_OK


class InvalidPayment(ValueError):
    """A POST /payments body that must be refused: http_status is 400 or 422."""

    def __init__(self, int http_status, str message):
        super().__init__(message)
        self.http_status = http_status
        self.message = message


_MESSAGES = {
    PAYMENT_MALFORMED_JSON: "body is not valid JSON",
    PAYMENT_NOT_AN_OBJECT: "body must be a JSON object",
    PAYMENT_DUPLICATE_FIELD: "a field appears twice",
    PAYMENT_MISSING_CORRELATION_ID: "correlationId is required",
    PAYMENT_BAD_CORRELATION_ID: "correlationId must be a UUID string",
    PAYMENT_MISSING_AMOUNT: "amount is required",
    PAYMENT_AMOUNT_NOT_A_NUMBER: "amount must be a number",
    PAYMENT_AMOUNT_NOT_POSITIVE: "amount must be positive",
    PAYMENT_AMOUNT_TOO_PRECISE: "amount must have at most 2 decimal places",
    PAYMENT_AMOUNT_TOO_LARGE: "amount is too large",
}


def parse_payment(bytes body) -> tuple:
    """Return (correlationId as 16 bytes, amount in cents); raise InvalidPayment."""
    cdef int64_t cents = 0
    cdef bytes uuid16 = PyBytes_FromStringAndSize(NULL, UUID_BYTES)
    cdef PaymentStatus status = parse_payment_body(
        <const unsigned char*>PyBytes_AS_STRING(body), len(body),
        <unsigned char*>PyBytes_AS_STRING(uuid16), &cents)
    if status != PAYMENT_OK:
        raise InvalidPayment(400 if status == PAYMENT_MALFORMED_JSON else 422, _MESSAGES[status])
    return uuid16, cents
