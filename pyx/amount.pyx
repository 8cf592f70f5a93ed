"""Exact money arithmetic at the edges: decimal text <-> integer cents."""
from libc.stdint cimport int64_t

from cpython.bytes cimport PyBytes_FromStringAndSize


class AmountError(ValueError):
    """An amount that is not a positive whole number of cents."""


_MESSAGES = {
    AMOUNT_SYNTAX: "amount must be a JSON number",
    AMOUNT_NOT_POSITIVE: "amount must be positive",
    AMOUNT_TOO_PRECISE: "amount must have at most 2 decimal places",
    AMOUNT_TOO_LARGE: "amount is too large",
}

MAX_CENTS = 10 ** <object>MAX_CENTS_DIGITS - 1


def parse_amount(text) -> int:
    """Return the cents of a JSON number token (str or bytes); raise AmountError."""
    cdef bytes raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    cdef int64_t cents = 0
    cdef AmountStatus status = parse_cents(raw, len(raw), &cents)
    if status != AMOUNT_OK:
        raise AmountError(_MESSAGES[status])
    return cents


def format_amount(int64_t cents) -> str:
    """Return cents as decimal text with two places, for JSON output."""
    cdef char buffer[CENTS_TEXT_MAX]
    cdef Py_ssize_t length = format_cents(cents, buffer)
    return PyBytes_FromStringAndSize(buffer, length).decode("ascii")
