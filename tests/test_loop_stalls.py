"""Nothing an instance does besides answering holds its event loop for long:
a backlog's flush, when the processors come back to it, is taken off the queue
in slices and sent a few requests per turn of the loop, so the answers that
arrive meanwhile wait for one small slice, not for the backlog.

perf/loop_turns.py runs the round (a fixed arrival rate from the C load
generator, both processors failing until a backlog is queued, then back) and
counts, per turn of the loop, what the instance took off the queue and sent.
These counts are exact; how long the turns took is a benchmark's figure
(make bench-loop), beside an idle loop's on the same host."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))

import loop_turns  # noqa: E402
from native import build_tools  # noqa: E402

from paycore.service.delivery import SENDS_PER_TURN  # noqa: E402

# A slice is 200 µs of taking payments off the queue, about 15 µs each here:
# a pass that ran unsliced would take up to PAYCORE_MAX_IN_FLIGHT (600) at once.
MOST_TAKEN_PER_TURN = 64


@pytest.fixture(scope="module")
def loadgen() -> Path:
    return build_tools()["loadgen"]


def test_a_backlog_drains_a_slice_and_a_few_sends_per_turn_of_the_loop(tmp_path, loadgen):
    shape = loop_turns.Round(rate=300, seconds=5, backlog=900)
    report = loop_turns.drain_a_backlog(loadgen, tmp_path, shape)
    summary = (f"{report.times.turns} turns; most taken / sent in one: {report.most_taken} / {report.most_sent}; "
               f"{report.taken} taken, {report.sent} sent while measured")
    print(summary)
    assert report.posted["ok_2xx"] == report.posted["requests"] >= shape.rate * shape.seconds * 0.9
    assert report.taken >= shape.backlog, summary
    assert 1 <= report.most_sent <= SENDS_PER_TURN, summary
    assert report.most_taken <= MOST_TAKEN_PER_TURN, summary
    assert report.gc_collections[0] > 0, "the collector's pauses are not observed"
