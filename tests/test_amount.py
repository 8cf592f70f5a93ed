import random
from decimal import Decimal

import pytest

from paycore.core.amount import MAX_CENTS, AmountError, format_amount, parse_amount


@pytest.mark.parametrize("text, cents", [
    ("20.05", 2005), ("20.050", 2005), ("2005e-2", 2005), ("2.005E1", 2005), ("0.01", 1),
    ("1", 100), ("1e2", 10000), ("0.10", 10), ("1E+2", 10000), ("999999999999.99", MAX_CENTS),
    ("100000000000000000000000000000e-30", 10), ("1.100000000000000000000000000000", 110),
])
def test_exact_cents(text, cents):
    assert parse_amount(text) == cents
    assert parse_amount(text.encode()) == cents


@pytest.mark.parametrize("text, reason", [
    ("20.055", "2 decimal places"), ("0.001", "2 decimal places"), ("1e-3", "2 decimal places"),
    ("0", "positive"), ("-1", "positive"), ("-0", "positive"), ("0.00", "positive"),
    ("1000000000000", "too large"), ("1e400", "too large"), ("1" + "0" * 40, "too large"),
    ("01", "JSON number"), ("1.", "JSON number"), (".5", "JSON number"), ("1e", "JSON number"),
    ("+1", "JSON number"), ("", "JSON number"), ("NaN", "JSON number"), ("1.2.3", "JSON number"),
    ("0x10", "JSON number"), (" 1", "JSON number"),
])
def test_refused(text, reason):
    with pytest.raises(AmountError, match=reason):
        parse_amount(text)


def test_matches_decimal_arithmetic():
    rng = random.Random(2025)
    for _ in range(20000):
        cents = rng.randrange(1, MAX_CENTS + 1)
        text = f"{Decimal(cents) / 100:f}"
        assert parse_amount(text) == cents
        assert format_amount(cents) == f"{Decimal(cents) / 100:.2f}"


@pytest.mark.parametrize("cents, text", [
    (0, "0.00"), (5, "0.05"), (2005, "20.05"), (-30, "-0.30"), (2**63 - 1, "92233720368547758.07"),
    (-(2**63), "-92233720368547758.08"),
])
def test_format(cents, text):
    assert format_amount(cents) == text
