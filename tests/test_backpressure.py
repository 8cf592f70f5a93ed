"""A full queue answers 503 with Retry-After and drops nothing it accepted."""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import quick_stack, random_uuid
from test_service import assert_ledgers_catch_up, payment, post_many

QUEUE_CAPACITY = 40
MAX_BATCHES = 10
# Payments a probe may take out of a full queue while both processors fail.
PROBE_SLOTS = 4


@pytest.fixture(scope="module")
def small_queue():
    with quick_stack(PAYCORE_QUEUE_CAPACITY=str(QUEUE_CAPACITY)) as running:
        yield running


def test_full_queue_refuses_with_retry_after_and_keeps_what_it_accepted(small_queue):
    live = small_queue
    live.default.set_failure(True)
    live.fallback.set_failure(True)
    time.sleep(1.2)  # both instances learn that nothing can be sent
    accepted, refused = [], []
    # The kernel spreads connections over the instances by their addresses, so
    # one instance may fill before the other: batches on fresh connections go
    # on until one is refused whole, which means both queues are full (40
    # connections all on the instance with room left: once in 2**40 runs).
    for _ in range(MAX_BATCHES):
        ids = [str(random_uuid()) for _ in range(QUEUE_CAPACITY)]
        statuses = asyncio.run(post_many(live.port, [payment(i) for i in ids], concurrency=QUEUE_CAPACITY))
        assert set(statuses) <= {202, 503}, statuses
        accepted += [i for i, status in zip(ids, statuses) if status == 202]
        refused += [i for i, status in zip(ids, statuses) if status == 503]
        if 202 not in statuses:
            break
    else:
        pytest.fail(f"{MAX_BATCHES} batches and still accepting: {len(accepted)} accepted")
    # Two instances, one queue each; a probe may have taken one or two out meanwhile.
    assert 2 * QUEUE_CAPACITY <= len(accepted) <= 2 * QUEUE_CAPACITY + PROBE_SLOTS
    connection = live.client()
    for _ in range(PROBE_SLOTS):
        correlation_id = str(random_uuid())
        connection.request("POST", "/payments", body=payment(correlation_id))
        response = connection.getresponse()
        response.read()
        if response.status != 202:
            break
        # A probe's payment was out of its queue at that moment (a millisecond
        # or two at each backoff): that post took its place, and counts.
        accepted.append(correlation_id)
    assert response.status == 503 and response.getheader("Retry-After") == "1"

    live.default.set_failure(False)
    live.fallback.set_failure(False)
    live.wait_until_processed(len(accepted), timeout_s=30)
    summary = assert_ledgers_catch_up(live)
    assert summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"] == len(accepted)
    assert all(live.default.held(i) is None and live.fallback.held(i) is None for i in refused[:20])
