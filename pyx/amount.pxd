# Money as integer cents: JSON number text -> cents, cents -> decimal text.
# The conversions are inline so that the request parser compiles them into
# its own hot path. No binary float is ever involved.
from libc.stdint cimport int64_t, uint64_t

cdef enum AmountStatus:
    AMOUNT_OK = 0
    AMOUNT_SYNTAX = 1          # not a JSON number
    AMOUNT_NOT_POSITIVE = 2    # zero or negative
    AMOUNT_TOO_PRECISE = 3     # not a whole number of cents
    AMOUNT_TOO_LARGE = 4       # more than MAX_CENTS

cdef enum:
    # 999,999,999,999.99: far above any single payment, far below int64
    # overflow even when a ledger sums millions of them.
    MAX_CENTS_DIGITS = 14

# Longest text format_cents writes for a non-negative int64.
cdef enum:
    CENTS_TEXT_MAX = 24


cdef inline bint _is_digit(unsigned char c) noexcept nogil:
    return c >= 48 and c <= 57


cdef inline AmountStatus parse_cents(const unsigned char* text, Py_ssize_t length,
                                     int64_t* cents) noexcept nogil:
    """Parse one JSON number token into cents, exactly.

    The value must be a positive whole number of cents: 20.05, 20.050 and
    2005e-2 are all 2005 cents; 20.055 is too precise.
    """
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t int_start, int_end, frac_start, frac_end
    cdef bint negative = False
    cdef bint exponent_negative = False
    cdef int64_t exponent = 0
    cdef uint64_t mantissa = 0    # significant digits without trailing zeros
    cdef int64_t zero_run = 0     # zeros after the last non-zero digit
    cdef int64_t significant = 0  # digits from the first to the last non-zero
    cdef bint overflow = False
    cdef int64_t shift
    cdef Py_ssize_t k
    cdef unsigned char digit

    # --- grammar: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
    if i < length and text[i] == 45:  # '-'
        negative = True
        i += 1
    int_start = i
    while i < length and _is_digit(text[i]):
        i += 1
    int_end = i
    if int_end == int_start:
        return AMOUNT_SYNTAX
    if text[int_start] == 48 and int_end - int_start > 1:
        return AMOUNT_SYNTAX  # JSON forbids leading zeros
    frac_start = frac_end = i
    if i < length and text[i] == 46:  # '.'
        i += 1
        frac_start = i
        while i < length and _is_digit(text[i]):
            i += 1
        frac_end = i
        if frac_end == frac_start:
            return AMOUNT_SYNTAX
    if i < length and (text[i] == 101 or text[i] == 69):  # 'e' 'E'
        i += 1
        if i < length and (text[i] == 43 or text[i] == 45):  # '+' '-'
            exponent_negative = text[i] == 45
            i += 1
        if i >= length or not _is_digit(text[i]):
            return AMOUNT_SYNTAX
        while i < length and _is_digit(text[i]):
            if exponent < 1000000:  # clamp: any such exponent is out of range anyway
                exponent = exponent * 10 + (text[i] - 48)
            i += 1
        if exponent_negative:
            exponent = -exponent
    if i != length:
        return AMOUNT_SYNTAX

    # --- value: digits D (integer and fraction) times 10^(exponent - fraction length)
    k = int_start
    while k < frac_end:
        if k == int_end:
            k = frac_start
            if k == frac_end:
                break
        digit = text[k] - 48
        k += 1
        if digit == 0:
            if significant != 0:
                zero_run += 1
            continue
        significant += zero_run + 1
        if not overflow:
            while zero_run >= 0:
                if mantissa > 1844674407370955160ULL:
                    overflow = True
                    break
                mantissa *= 10
                zero_run -= 1
            mantissa += digit
        zero_run = 0

    if significant == 0 or negative:
        return AMOUNT_NOT_POSITIVE
    # cents = mantissa * 10^shift
    shift = exponent - (frac_end - frac_start) + zero_run + 2
    if significant + shift > MAX_CENTS_DIGITS:
        return AMOUNT_TOO_LARGE
    if shift < 0 or overflow:
        return AMOUNT_TOO_PRECISE
    while shift > 0:
        mantissa *= 10
        shift -= 1
    cents[0] = <int64_t>mantissa
    return AMOUNT_OK


cdef inline Py_ssize_t format_cents(int64_t cents, char* out) noexcept nogil:
    """Write cents as decimal text with exactly two places ("20.05", "-0.30");
    out must hold CENTS_TEXT_MAX bytes. Returns the length written."""
    cdef char reversed_digits[CENTS_TEXT_MAX]
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t length = 0
    cdef uint64_t magnitude
    if cents < 0:
        out[length] = 45
        length += 1
        magnitude = <uint64_t>(-(cents + 1)) + 1
    else:
        magnitude = <uint64_t>cents
    while magnitude > 0 or count < 3:
        reversed_digits[count] = 48 + <char>(magnitude % 10)
        magnitude //= 10
        count += 1
    while count > 0:
        count -= 1
        out[length] = reversed_digits[count]
        length += 1
        if count == 2:
            out[length] = 46  # '.'
            length += 1
    return length
