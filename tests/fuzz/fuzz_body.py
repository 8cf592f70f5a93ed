#!/usr/bin/env python3
"""Fuzz target: the POST /payments body parser against a reference reading.

Every input must get exactly the answer that the parser's rules give for the
body as Python's json module reads it, with numbers kept as their text and
worked with as Decimal: (correlationId as 16 bytes, amount as int cents), or
InvalidPayment with its status (400 malformed JSON, 422 bad fields) and
message. Any other exception is a crash. orjson must agree on what is JSON,
except where it is stricter than RFC 8259.

Run it through run.py, which loads the parser built with coverage and
AddressSanitizer (PAYCORE_FUZZ_PARSER); without it the installed build is
used, which libFuzzer sees no coverage of.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
import uuid
from dataclasses import dataclass
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal

import atheris
import orjson

from paycore.core.amount import MAX_CENTS


@dataclass(frozen=True)
class Refusal:
    http_status: int
    message: str


MALFORMED = Refusal(400, "body is not valid JSON")
NOT_AN_OBJECT = Refusal(422, "body must be a JSON object")
DUPLICATE_FIELD = Refusal(422, "a field appears twice")
MISSING_CORRELATION_ID = Refusal(422, "correlationId is required")
BAD_CORRELATION_ID = Refusal(422, "correlationId must be a UUID string")
MISSING_AMOUNT = Refusal(422, "amount is required")
AMOUNT_NOT_A_NUMBER = Refusal(422, "amount must be a number")
AMOUNT_NOT_POSITIVE = Refusal(422, "amount must be positive")
AMOUNT_TOO_PRECISE = Refusal(422, "amount must have at most 2 decimal places")
AMOUNT_TOO_LARGE = Refusal(422, "amount is too large")

# The parser refuses a value inside more containers than this as malformed.
MAX_NESTING = 32
CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Arithmetic that never rounds, on any exponent Decimal can hold.
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
# Decimal holds exponents up to about 10**18. Beyond 10**17 the exponent
# alone decides an amount's verdict for any digit string an input can hold.
EXPONENT_BOUND = 10**17


class JsonObject(list):
    """A JSON object as its (name, value) pairs in document order, so duplicates stay visible."""


@dataclass(frozen=True)
class JsonNumber:
    """A JSON number as its text, for amounts to be worked out exactly."""
    text: str


NOT_JSON = object()


def load_parser():
    path = os.environ.get("PAYCORE_FUZZ_PARSER")
    if path is None:
        return importlib.import_module("paycore.core.payment_parser")
    spec = importlib.util.spec_from_file_location("paycore.core.payment_parser", path)
    parser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parser)
    return parser


payment_parser = load_parser()


def test_one_input(body: bytes) -> None:
    try:
        uuid16, cents = payment_parser.parse_payment(body)
    except payment_parser.InvalidPayment as refusal:
        outcome = Refusal(refusal.http_status, refusal.message)
    else:
        assert type(uuid16) is bytes and type(cents) is int, (uuid16, cents)
        outcome = (uuid16, cents)
    expected = reference_outcome(body)
    assert outcome == expected, f"parser: {outcome!r}, reference: {expected!r}"


def reference_outcome(body: bytes) -> tuple[bytes, int] | Refusal:
    try:
        document = read_json(body)
    except RecursionError:
        # Nested far deeper than MAX_NESTING; orjson's own depth limit is not
        # Python's, so it is not asked.
        return MALFORMED
    check_orjson_agrees(body, document)
    if document is NOT_JSON or max(depth for _, depth in items(document)) > MAX_NESTING:
        return MALFORMED
    if not isinstance(document, JsonObject):
        return NOT_AN_OBJECT
    return payment_fields(document)


def read_json(body: bytes):
    """The body as RFC 8259 JSON (UTF-8, no NaN or Infinity), or NOT_JSON."""
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=JsonObject, parse_int=JsonNumber,
                          parse_float=JsonNumber, parse_constant=refuse_constant)
    except ValueError:
        return NOT_JSON


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def items(document):
    """Every value and member name in the document, with the number of containers around it."""
    pending = [(document, 0)]
    while pending:
        item, depth = pending.pop()
        yield item, depth
        if isinstance(item, JsonObject):
            pending.extend((part, depth + 1) for member in item for part in member)
        elif isinstance(item, list):
            pending.extend((element, depth + 1) for element in item)


def check_orjson_agrees(body: bytes, document) -> None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        assert document is NOT_JSON or orjson_is_stricter(document), "orjson refuses this JSON"
    else:
        assert document is not NOT_JSON, "orjson accepts what is not JSON"


def orjson_is_stricter(document) -> bool:
    """orjson refuses what RFC 8259 allows: numbers beyond a double's range and lone surrogates."""
    return any(
        isinstance(item, JsonNumber) and math.isinf(float(item.text))  # orjson reads doubles
        or isinstance(item, str) and any("\ud800" <= char <= "\udfff" for char in item)
        for item, _ in items(document))


def payment_fields(members: JsonObject) -> tuple[bytes, int] | Refusal:
    """The two fields as the parser reads them: the first field error in document order wins."""
    error = None
    fields = {}
    for name, value in members:
        if name in ("correlationId", "amount"):
            error = error or (DUPLICATE_FIELD if name in fields else field_error(name, value))
            fields[name] = value
    if error:
        return error
    if "correlationId" not in fields:
        return MISSING_CORRELATION_ID
    if "amount" not in fields:
        return MISSING_AMOUNT
    return uuid.UUID(fields["correlationId"]).bytes, amount_cents(fields["amount"].text)


def field_error(name: str, value) -> Refusal | None:
    if name == "correlationId":
        return None if type(value) is str and CANONICAL_UUID.fullmatch(value) else BAD_CORRELATION_ID
    if not isinstance(value, JsonNumber):
        return AMOUNT_NOT_A_NUMBER
    cents = amount_cents(value.text)
    return cents if isinstance(cents, Refusal) else None


def amount_cents(text: str) -> int | Refusal:
    """A positive whole number of cents up to MAX_CENTS, by Decimal arithmetic."""
    significand, _, exponent = text.lower().partition("e")
    bounded_exponent = max(-EXPONENT_BOUND, min(EXPONENT_BOUND, int(exponent or "0")))
    value = Decimal(f"{significand}e{bounded_exponent}")
    if value <= 0:
        return AMOUNT_NOT_POSITIVE
    cents = EXACT.multiply(value, 100)
    # Too large means more than 14 whole digits of cents, even when a
    # fraction of a cent also makes it too precise.
    if cents >= MAX_CENTS + 1:
        return AMOUNT_TOO_LARGE
    if cents != cents.to_integral_value():
        return AMOUNT_TOO_PRECISE
    return int(cents)


if __name__ == "__main__":
    # An exponent may have more digits than int() reads by default.
    sys.set_int_max_str_digits(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
