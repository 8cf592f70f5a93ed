"""Amounts as properties: every JSON spelling of a whole number of cents parses
to exactly those cents, everything else is refused, and nothing on the way is
a binary float: amounts that a double cannot hold come out exact, and digits
far beyond a double's precision still count."""
import decimal
import re
from decimal import Decimal

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from paycore.core.amount import MAX_CENTS, AmountError, format_amount, parse_amount

# Decimal arithmetic that raises rather than round.
EXACT = decimal.Context(prec=200, traps=[decimal.Inexact, decimal.Rounded])

# RFC 8259's number grammar.
JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")

cents_in_range = st.integers(min_value=1, max_value=MAX_CENTS)


@st.composite
def spellings(draw, cents_values=cents_in_range):
    """(cents, JSON number text for cents / 100): any decimal point position,
    exponent, trailing zeros and zeros after the point."""
    cents = draw(cents_values)
    trailing_zeros = draw(st.integers(min_value=0, max_value=30))
    digits = str(cents) + "0" * trailing_zeros
    # The value is int(digits) * 10**(-2 - trailing_zeros); with `fraction_length`
    # digits after the point the exponent makes up the difference.
    fraction_length = draw(st.integers(min_value=0, max_value=len(digits) + 5))
    exponent = fraction_length - 2 - trailing_zeros
    whole = digits[:-fraction_length] if fraction_length else digits
    fraction = digits[-fraction_length:].rjust(fraction_length, "0") if fraction_length else ""
    text = (whole or "0") + ("." + fraction if fraction else "")
    if exponent or draw(st.booleans()):
        marker = draw(st.sampled_from(["e", "E"]))
        sign = "-" if exponent < 0 else draw(st.sampled_from(["", "+"]))
        leading_zeros = "0" * draw(st.integers(min_value=0, max_value=3))
        text += f"{marker}{sign}{leading_zeros}{abs(exponent)}"
    return cents, text


def decimal_cents(text: str) -> Decimal:
    return EXACT.multiply(Decimal(text), 100)


def refusal(text: str) -> str:
    with pytest.raises(AmountError) as refused:
        parse_amount(text)
    return str(refused.value)


@given(spellings())
@example((2005, "20.050"))
@example((2005, "2005e-2"))
@example((2005, "2.005E1"))
@example((MAX_CENTS, "999999999999.99000000000000000000"))  # digits past 2**64
def test_every_spelling_parses_to_its_exact_cents(spelling):
    cents, text = spelling
    assert decimal_cents(text) == cents  # the spelling is right
    assert parse_amount(text) == cents
    assert parse_amount(text.encode()) == cents


@given(cents_in_range)
# A double holds none of these: float("0.29") * 100 is 28.999999999999996.
@example(29)
@example(57)
@example(12345678901234)
def test_format_then_parse_round_trips(cents):
    text = format_amount(cents)
    assert Decimal(text) == Decimal(cents) / 100
    assert parse_amount(text) == cents


@given(st.lists(cents_in_range, min_size=2, max_size=20))
@example([10, 20])  # as floats, 0.1 + 0.2 != 0.3
def test_sums_of_parsed_amounts_match_decimal_sums(cents_values):
    texts = [format_amount(cents) for cents in cents_values]
    total = sum((Decimal(text) for text in texts), Decimal(0))
    assert sum(parse_amount(text) for text in texts) == EXACT.multiply(total, 100)


@given(cents_in_range, st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=9))
@example(2005, 14, 1)  # 20.05000000000000001 is 20.05 as a double
@example(MAX_CENTS, 0, 1)  # 999999999999.991 is 999999999999.99 as a double
def test_a_fraction_of_a_cent_is_refused_however_small(cents, zeros, last_digit):
    text = f"{format_amount(cents)}{'0' * zeros}{last_digit}"
    assert decimal_cents(text) != int(decimal_cents(text))
    assert "2 decimal places" in refusal(text)


@given(st.integers(min_value=1, max_value=10**40), st.integers(min_value=3, max_value=40))
def test_any_decimal_short_of_whole_cents_is_refused(units, places):
    text = f"{units}e-{places}"
    cents = decimal_cents(text)
    assume(cents != int(cents))
    # More than 14 whole digits of cents is too large before it is too precise.
    expected = "too large" if cents >= MAX_CENTS + 1 else "2 decimal places"
    assert expected in refusal(text)


@given(spellings())
def test_negative_amounts_are_refused(spelling):
    _, text = spelling
    assert "positive" in refusal("-" + text)


@pytest.mark.parametrize("text", ["0", "-0", "0.00", "0e5", "-0.0E-3", "0.000000000000000000000"])
def test_zero_is_refused(text):
    assert "positive" in refusal(text)


@given(spellings(cents_values=st.integers(min_value=MAX_CENTS + 1, max_value=10**40)))
@example((MAX_CENTS + 1, "1000000000000"))
@example((2**53 + 1, "9007199254740993e-2"))
def test_amounts_over_the_maximum_are_refused(spelling):
    _, text = spelling
    assert "too large" in refusal(text)


@given(st.one_of(st.text(alphabet="0123456789.eE+- x\"", max_size=12),
                 st.from_regex(JSON_NUMBER, fullmatch=True)))
def test_any_text_is_refused_or_read_exactly(text):
    try:
        cents = parse_amount(text)
    except AmountError:
        return
    assert JSON_NUMBER.fullmatch(text)
    assert decimal_cents(text) == cents
