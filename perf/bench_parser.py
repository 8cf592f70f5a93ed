"""The POST /payments body parser against orjson doing the same job.

Both turn the body into (16 UUID bytes, cents) with the same checks; orjson's
route goes through a binary float for the amount, which the service may not
do, so it is here only to show what the compiled parser costs in comparison.
Run: .venv/bin/python perf/bench_parser.py  (PARSER_ROUNDS: calls per timing, default 200,000)
"""
from __future__ import annotations

import os
import statistics
import timeit
import uuid

import orjson

from paycore.core.correlation_id import uuid_to_bytes
from paycore.core.payment_parser import parse_payment

BODY = b'{"correlationId":"%s","amount":20.05}' % str(uuid.uuid4()).encode()
ROUNDS = int(os.environ.get("PARSER_ROUNDS", "200000"))
REPEATS = 7


def parse_with_orjson(body: bytes) -> tuple[bytes, int]:
    fields = orjson.loads(body)
    amount = fields["amount"]
    if type(amount) not in (int, float) or amount <= 0:
        raise ValueError("amount")
    cents = round(amount * 100)
    if abs(cents - amount * 100) > 1e-6:
        raise ValueError("amount precision")
    return uuid_to_bytes(fields["correlationId"]), cents


def per_call_ns(function) -> list[float]:
    return [seconds / ROUNDS * 1e9
            for seconds in timeit.repeat(lambda: function(BODY), number=ROUNDS, repeat=REPEATS)]


def main() -> None:
    assert parse_payment(BODY) == parse_with_orjson(BODY)
    # Interleaved, so both see the same machine noise.
    results: dict[str, list[float]] = {"cython parser": [], "orjson + checks": []}
    for _ in range(3):
        results["cython parser"] += per_call_ns(parse_payment)
        results["orjson + checks"] += per_call_ns(parse_with_orjson)
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, median in medians.items():
        print(f"{name:>16}: median {median:7.0f} ns per body")
    print(f"{'ratio':>16}: orjson route takes {medians['orjson + checks'] / medians['cython parser']:.2f}x "
          f"the cython parser's time")


if __name__ == "__main__":
    main()
