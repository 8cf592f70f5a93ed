"""Decoding what clients send and encoding money for what the processor answers."""
import json
import re
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, NamedTuple

import orjson

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?"
)
_EPOCH = datetime(1970, 1, 1)
_ONE_SECOND = timedelta(seconds=1)
_CENT = Decimal("0.01")
# 28 significant digits, like the .NET decimal the real processor parses amounts into:
# larger amounts cannot be rounded to cents and are rejected.
_AMOUNT_CONTEXT = Context(prec=28, rounding=ROUND_HALF_UP)
_INT32_MAX = 2**31 - 1


class InvalidRequest(ValueError):
    """A request the processor answers with 400; the message says why."""


class PaymentRequest(NamedTuple):
    correlation_id: str
    cents: int
    requested_at: str
    requested_at_us: int


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not valid JSON")


# The amount must be rounded from its decimal text, so this one body is decoded with a
# decoder that hands every non-integer number over as a Decimal instead of a float.
_EXACT_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


def decode_payment_request(body: bytes) -> PaymentRequest:
    try:
        payment = _EXACT_DECODER.decode(body.decode())
    except (ValueError, RecursionError) as error:
        raise InvalidRequest("body must be a JSON object") from error
    if type(payment) is not dict:
        raise InvalidRequest("body must be a JSON object")
    requested_at = payment.get("requestedAt")
    if type(requested_at) is not str:
        raise InvalidRequest("requestedAt must be a string")
    return PaymentRequest(
        correlation_id=parse_correlation_id(payment.get("correlationId")),
        cents=_amount_cents(payment.get("amount")),
        requested_at=requested_at,
        requested_at_us=parse_timestamp(requested_at),
    )


def parse_correlation_id(value: object) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID given as 8-4-4-4-12 hex digits."""
    if type(value) is not str or not _UUID.fullmatch(value):
        raise InvalidRequest("correlationId must be a UUID")
    return value.lower()


def parse_timestamp(text: str) -> int:
    """Microseconds since the epoch of an ISO-8601 date-time; no zone means UTC,
    digits beyond the microsecond are dropped."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise InvalidRequest(f"not an ISO-8601 timestamp: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError as error:
        raise InvalidRequest(f"not a valid date-time: {text!r}") from error
    seconds = (moment - _EPOCH) // _ONE_SECOND
    if zone and zone != "Z":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    microseconds = int(fraction[:6].ljust(6, "0")) if fraction else 0
    return seconds * 1_000_000 + microseconds


def _amount_cents(value: object) -> int:
    if type(value) is not int and type(value) is not Decimal:
        raise InvalidRequest("amount must be a number")
    try:
        rounded = Decimal(value).quantize(_CENT, context=_AMOUNT_CONTEXT)
    except InvalidOperation as error:
        raise InvalidRequest("amount is out of range") from error
    return int(rounded.scaleb(2))


def format_cents(cents: int) -> bytes:
    """Cents as a JSON number with exactly two decimal places."""
    whole, fraction = divmod(abs(cents), 100)
    return b"%s%d.%02d" % (b"-" if cents < 0 else b"", whole, fraction)


def decode_object_field(body: bytes, name: str, kind: type) -> Any:
    """The field `name` of a JSON object body, which must be exactly of type `kind`."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest("body must be a JSON object") from error
    if type(document) is not dict:
        raise InvalidRequest("body must be a JSON object")
    value = document.get(name)
    if type(value) is not kind:
        raise InvalidRequest(f"{name} must be a {'boolean' if kind is bool else kind.__name__}")
    return value


def decode_delay(body: bytes) -> int:
    delay = decode_object_field(body, "delay", int)
    if not 0 <= delay <= _INT32_MAX:
        raise InvalidRequest("delay must be between 0 and 2147483647 ms")
    return delay
