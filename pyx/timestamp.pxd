# Time inside the core is integer milliseconds since the Unix epoch (UTC);
# ISO-8601 text only at the edges. Inline so callers compile it in.
from libc.stdint cimport int64_t

cdef enum:
    ISO_MS_LENGTH = 24   # "2025-08-21T05:16:05.965Z"
    MS_PER_DAY = 86400000


cdef inline int64_t _floor_div(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline int64_t days_from_civil(int64_t year, int64_t month, int64_t day) noexcept nogil:
    # H. Hinnant's algorithm: proleptic Gregorian date -> days since 1970-01-01.
    cdef int64_t era, year_of_era, day_of_year, day_of_era
    if month <= 2:
        year -= 1
    era = _floor_div(year, 400)
    year_of_era = year - era * 400
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


cdef inline void _write_digits(char* out, int64_t value, int width) noexcept nogil:
    cdef int i = width - 1
    while i >= 0:
        out[i] = 48 + <char>(value % 10)
        value //= 10
        i -= 1


cdef inline Py_ssize_t format_iso_ms(int64_t ms, char* out) noexcept nogil:
    """Write ms as "YYYY-MM-DDTHH:MM:SS.mmmZ" (ISO_MS_LENGTH bytes) for years 0..9999."""
    cdef int64_t days = _floor_div(ms, MS_PER_DAY)
    cdef int64_t ms_of_day = ms - days * MS_PER_DAY
    cdef int64_t z = days + 719468
    cdef int64_t era = _floor_div(z, 146097)
    cdef int64_t day_of_era = z - era * 146097
    cdef int64_t year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524
                                - day_of_era // 146096) // 365
    cdef int64_t day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    cdef int64_t month_index = (5 * day_of_year + 2) // 153
    cdef int64_t day = day_of_year - (153 * month_index + 2) // 5 + 1
    cdef int64_t month = month_index + 3 if month_index < 10 else month_index - 9
    cdef int64_t year = year_of_era + era * 400 + (1 if month <= 2 else 0)
    _write_digits(out, year, 4)
    out[4] = 45
    _write_digits(out + 5, month, 2)
    out[7] = 45
    _write_digits(out + 8, day, 2)
    out[10] = 84  # 'T'
    _write_digits(out + 11, ms_of_day // 3600000, 2)
    out[13] = 58
    _write_digits(out + 14, (ms_of_day // 60000) % 60, 2)
    out[16] = 58
    _write_digits(out + 17, (ms_of_day // 1000) % 60, 2)
    out[19] = 46
    _write_digits(out + 20, ms_of_day % 1000, 3)
    out[23] = 90  # 'Z'
    return ISO_MS_LENGTH


cdef inline int _read_fixed(const unsigned char* text, Py_ssize_t length, Py_ssize_t at,
                            int width, int64_t* value) noexcept nogil:
    cdef int64_t result = 0
    cdef int i
    if at + width > length:
        return -1
    for i in range(width):
        if text[at + i] < 48 or text[at + i] > 57:
            return -1
        result = result * 10 + (text[at + i] - 48)
    value[0] = result
    return 0


cdef inline bint _is_leap(int64_t year) noexcept nogil:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


cdef inline int parse_iso(const unsigned char* text, Py_ssize_t length, bint round_up,
                          int64_t* ms) noexcept nogil:
    """Parse an ISO-8601 timestamp: YYYY-MM-DD[(T| )HH:MM[:SS[.fraction]]][Z|±HH[:MM]].

    No zone means UTC. Finer than a millisecond rounds down, or up when
    round_up is set: an inclusive lower bound must not take in the
    millisecond before it. Returns 0, or -1 for text that is not such a time.
    """
    cdef int64_t year, month, day, hour = 0, minute = 0, second = 0
    cdef int64_t millis = 0, offset_hours = 0, offset_minutes = 0
    cdef int64_t digit_weight = 100
    cdef bint finer = False
    cdef int offset_sign
    cdef Py_ssize_t i = 10
    cdef int month_days
    if (_read_fixed(text, length, 0, 4, &year) or length < 10 or text[4] != 45
            or _read_fixed(text, length, 5, 2, &month) or text[7] != 45
            or _read_fixed(text, length, 8, 2, &day)):
        return -1
    if month < 1 or month > 12 or day < 1:
        return -1
    month_days = 30 if (month == 4 or month == 6 or month == 9 or month == 11) else 31
    if month == 2:
        month_days = 29 if _is_leap(year) else 28
    if day > month_days:
        return -1
    if i < length and (text[i] == 84 or text[i] == 116 or text[i] == 32):  # T t space
        if (_read_fixed(text, length, i + 1, 2, &hour) or i + 3 >= length or text[i + 3] != 58
                or _read_fixed(text, length, i + 4, 2, &minute)):
            return -1
        i += 6
        if i < length and text[i] == 58:
            if _read_fixed(text, length, i + 1, 2, &second):
                return -1
            i += 3
            if i < length and (text[i] == 46 or text[i] == 44):  # '.' or ','
                i += 1
                if i >= length or text[i] < 48 or text[i] > 57:
                    return -1
                while i < length and 48 <= text[i] <= 57:
                    if digit_weight > 0:
                        millis += (text[i] - 48) * digit_weight
                        digit_weight //= 10
                    elif text[i] != 48:
                        finer = True
                    i += 1
        if hour > 23 or minute > 59 or second > 59:
            return -1
    if i < length:
        if (text[i] == 90 or text[i] == 122) and i + 1 == length:  # Z z
            i += 1
        elif text[i] == 43 or text[i] == 45:  # + -
            offset_sign = 1 if text[i] == 43 else -1
            if _read_fixed(text, length, i + 1, 2, &offset_hours):
                return -1
            i += 3
            if i < length and text[i] == 58:
                i += 1
            if i < length:
                if _read_fixed(text, length, i, 2, &offset_minutes):
                    return -1
                i += 2
            if offset_hours > 23 or offset_minutes > 59 or i != length:
                return -1
            millis -= offset_sign * (offset_hours * 3600000 + offset_minutes * 60000)
        else:
            return -1
    ms[0] = (days_from_civil(year, month, day) * MS_PER_DAY
             + hour * 3600000 + minute * 60000 + second * 1000 + millis
             + (1 if finer and round_up else 0))
    return 0
