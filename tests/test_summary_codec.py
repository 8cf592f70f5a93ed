"""The summary's wire format: the from/to bounds read out of a query string,
and the JSON body written from the ledger's totals."""
import json
from decimal import Decimal
from urllib.parse import quote, unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from paycore.core.amount import MAX_CENTS
from paycore.core.summary_codec import summary_body, summary_range
from paycore.core.timestamp import format_timestamp, parse_timestamp

STAMP = "2025-08-21T05:16:05.965Z"
MS = 1755753365965


@pytest.mark.parametrize("query, bounds", [
    (b"", (None, None)),
    (b"from=" + STAMP.encode(), (MS, None)),
    (b"to=" + STAMP.encode(), (None, MS)),
    (b"from=2025-08-21T05:16:05.9651Z&to=2025-08-21T05:16:05.9659Z", (MS + 1, MS)),
    # '+' is literal, as a UTC offset needs it; %2B is the same offset encoded.
    (b"to=2025-08-21T07:16:05.965+02:00", (None, MS)),
    (b"to=2025-08-21T07%3A16%3a05.965%2B02:00", (None, MS)),
    (b"from=&to", (None, None)),
    (b"&&page=2&from=2000-01-01&x&from=" + STAMP.encode() + b"&", (MS, None)),
    (b"fromage=x&too=y&From=z", (None, None)),
])
def test_bounds(query, bounds):
    assert summary_range(query) == bounds


@pytest.mark.parametrize("query", [
    b"from=yesterday", b"to=2025-13-01T00:00:00Z", b"from=" + STAMP.encode() + b"&to=x",
    b"from=2025-08-21%", b"from=2025-08-21T05:16%zz", b"to=%C3%A9", b"from=a=b",
    b"from=2025-08-21 ", "to=2025-08-21T05:16:05.965\u00e9".encode("utf-8"),
])
def test_a_bound_that_is_not_a_time_is_refused(query):
    with pytest.raises(ValueError, match="ISO-8601"):
        summary_range(query)


def reference_range(query: bytes) -> tuple[int | None, int | None]:
    """What the endpoint means: parameters split at '&' and the first '=', the
    last of each name counting, values percent-decoded ('+' kept), inclusive
    millisecond bounds."""
    params = dict(pair.partition(b"=")[::2] for pair in query.split(b"&") if pair)
    bounds = []
    for name, round_up in ((b"from", True), (b"to", False)):
        value = params.get(name)
        bounds.append(parse_timestamp(unquote(value.decode("latin-1")), round_up) if value else None)
    return bounds[0], bounds[1]


times = st.integers(min_value=0, max_value=253402300799999).map(format_timestamp)
fractions = st.text("0123456789", min_size=0, max_size=8)
offsets = st.sampled_from(["Z", "+02:00", "-0330", "+00", ""])
values = st.one_of(
    st.builds(lambda stamp, digits, offset: stamp[:-1] + digits + offset, times, fractions, offsets),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=30),
)
encodings = st.sampled_from([lambda text: text, lambda text: quote(text, safe=""),
                             lambda text: quote(text, safe=":+")])
pairs = st.tuples(st.sampled_from(["from", "to", "x", "fro", ""]), values, encodings)


@given(st.lists(pairs, max_size=5))
@example([("from", "2025-08-21T05:16:05.965%", lambda text: text)])
def test_bounds_agree_with_the_reference(parameters):
    query = "&".join(f"{name}={encode(value)}" for name, value, encode in parameters).encode("utf-8")
    try:
        expected = reference_range(query)
    except ValueError:
        with pytest.raises(ValueError):
            summary_range(query)
    else:
        assert summary_range(query) == expected


@given(st.tuples(*[st.integers(min_value=0, max_value=2 ** 80)] * 4))
@example((0, 0, 0, 0))
@example((3, 6015, 1, 5))
@example((2**63, 2**70 + 1, 0, 5))  # past int64: written exactly all the same
def test_body_is_the_totals_as_json_with_exact_amounts(totals):
    default_count, default_cents, fallback_count, fallback_cents = totals
    body = json.loads(summary_body(totals), parse_float=Decimal)
    assert body == {
        "default": {"totalRequests": default_count, "totalAmount": Decimal(default_cents) / 100},
        "fallback": {"totalRequests": fallback_count, "totalAmount": Decimal(fallback_cents) / 100},
    }


def test_amounts_are_written_with_two_places():
    body = summary_body((1, 2000, 2, MAX_CENTS))
    assert b'"totalAmount":20.00}' in body and b'"totalAmount":999999999999.99}' in body
