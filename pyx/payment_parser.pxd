# The POST /payments body -> (correlationId as 16 bytes, amount in cents).
# A strict JSON reader for one object: syntax errors are told apart from
# field errors so the service can answer 400 or 422.
from libc.stdint cimport int64_t

cdef enum PaymentStatus:
    PAYMENT_OK = 0
    PAYMENT_MALFORMED_JSON = 1        # 400
    PAYMENT_NOT_AN_OBJECT = 2         # 422 from here on
    PAYMENT_DUPLICATE_FIELD = 3
    PAYMENT_MISSING_CORRELATION_ID = 4
    PAYMENT_BAD_CORRELATION_ID = 5
    PAYMENT_MISSING_AMOUNT = 6
    PAYMENT_AMOUNT_NOT_A_NUMBER = 7
    PAYMENT_AMOUNT_NOT_POSITIVE = 8
    PAYMENT_AMOUNT_TOO_PRECISE = 9
    PAYMENT_AMOUNT_TOO_LARGE = 10

cdef PaymentStatus parse_payment_body(const unsigned char* body, Py_ssize_t length,
                                      unsigned char* uuid_out, int64_t* cents_out) noexcept nogil
