"""How a summary's range of requestedAt splits into the payments record's
aggregate buckets plus two narrow edges.

Buckets exist at several widths, aligned to the epoch, each width a multiple
of the one below it; so a range is the coarsest whole buckets it contains,
then on each side at most (ratio - 1) buckets of each finer width, then less
than the finest width at each end, which the record sums from its payments
rows. The cost of a summary grows with the number of widths, not with the
payments or the length of the range.
"""
from __future__ import annotations

from typing import NamedTuple

# 10 ms, 100 ms, 1 s, 1 min, 1 h, 1 day. A level is an index into this.
LEVEL_WIDTHS_MS = (10, 100, 1_000, 60_000, 3_600_000, 86_400_000)
DAY_MS = LEVEL_WIDTHS_MS[-1]
# At most a middle run at one level plus a run on each side at every finer one.
MAX_BUCKET_RUNS = 2 * len(LEVEL_WIDTHS_MS) - 1
MAX_EDGES = 2


class RangePlan(NamedTuple):
    # (level, first bucket start, last bucket start), both inclusive.
    buckets: tuple[tuple[int, int, int], ...]
    # (from_ms, to_ms), both inclusive: what no whole bucket covers.
    edges: tuple[tuple[int, int], ...]


def plan_range(from_ms: int, to_ms: int) -> RangePlan:
    """The bucket runs and edges that together cover [from_ms, to_ms] exactly
    once (both inclusive); nothing for an empty range."""
    if from_ms > to_ms:
        return RangePlan((), ())
    begin, end = from_ms, to_ms + 1  # half-open from here on
    for level in reversed(range(len(LEVEL_WIDTHS_MS))):
        width = LEVEL_WIDTHS_MS[level]
        left, right = _align_up(begin, width), end // width * width
        if left < right:
            break
    else:
        return RangePlan((), ((from_ms, to_ms),))
    buckets = [(level, left, right - width)]
    for finer in reversed(range(level)):
        width = LEVEL_WIDTHS_MS[finer]
        start = _align_up(begin, width)
        if start < left:
            buckets.append((finer, start, left - width))
            left = start
        stop = end // width * width
        if stop > right:
            buckets.append((finer, right, stop - width))
            right = stop
    edges = []
    if begin < left:
        edges.append((begin, left - 1))
    if right < end:
        edges.append((right, end - 1))
    return RangePlan(tuple(buckets), tuple(edges))


def _align_up(at_ms: int, width: int) -> int:
    return -(-at_ms // width) * width
