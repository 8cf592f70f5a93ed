import random
from datetime import datetime, timedelta, timezone

import pytest

from paycore.core.timestamp import format_timestamp, parse_timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_round_trip_against_datetime():
    rng = random.Random(7)
    for _ in range(20000):
        ms = rng.randrange(-30610224000000, 253402300799999)  # years 1000..9999
        text = format_timestamp(ms)
        expected = (EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        assert text == expected
        assert parse_timestamp(text) == ms


@pytest.mark.parametrize("text, ms", [
    ("2025-08-21T05:16:05.965Z", 1755753365965),
    ("2025-08-21T05:16:05Z", 1755753365000),
    ("2025-08-21T05:16Z", 1755753360000),
    ("2025-08-21T05:16:05.9Z", 1755753365900),
    ("2025-08-21T07:16:05.965+02:00", 1755753365965),
    ("2025-08-21T03:16:05.965-0200", 1755753365965),
    ("2025-08-21T05:16:05.965", 1755753365965),
    ("2025-08-21", 1755734400000),
    ("2024-02-29T00:00:00Z", 1709164800000),
])
def test_parse(text, ms):
    assert parse_timestamp(text) == ms


def test_sub_millisecond_digits_round_by_bound():
    assert parse_timestamp("2025-08-21T05:16:05.9651Z") == 1755753365965
    assert parse_timestamp("2025-08-21T05:16:05.9651Z", round_up=True) == 1755753365966
    assert parse_timestamp("2025-08-21T05:16:05.9650000Z", round_up=True) == 1755753365965


@pytest.mark.parametrize("text", [
    "", "x", "2025-02-30T00:00:00Z", "2023-02-29T00:00:00Z", "2025-13-01T00:00:00Z",
    "2025-08-21T24:00:00Z", "2025-08-21T05:60:00Z", "2025-08-21T05:16:05.Z", "2025-08-21T05:16:05ZZ",
    "2025-08-21T05:16:05+0", "2025/08/21", "21-08-2025",
])
def test_refused(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)
