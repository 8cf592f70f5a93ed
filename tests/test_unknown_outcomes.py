"""A timeout is an unknown outcome: the processor may still store the payment.
The service must neither lose it nor let a second processor have it too."""
from __future__ import annotations

import time

import pytest

from conftest import RunningStack, call, quick_stack, random_uuid
from test_service import accept_all, assert_ledgers_catch_up, assert_ledgers_match_processors, payment


@pytest.fixture(scope="module")
def impatient():
    """A stack whose instances give up on a processor after 800 ms."""
    with quick_stack(PAYCORE_REQUEST_TIMEOUT_MS="800", PAYCORE_PIN_RELEASE_MS="2000") as running:
        yield running


def held_by(live: RunningStack, correlation_id: str) -> list[str]:
    return [name for name, processor in (("default", live.default), ("fallback", live.fallback))
            if processor.held(correlation_id) is not None]


def test_timed_out_payments_stored_late_are_recorded_once(impatient):
    live = impatient
    live.reset()
    live.default.set_delay(2000)
    ids = []
    for _ in range(30):
        ids.append(str(random_uuid()))
        assert call(live.client(), "POST", "/payments", payment(ids[-1]))[0] == 202
        time.sleep(0.02)
    time.sleep(3)  # the first attempts land at the default after the service gave up
    live.default.set_delay(0)
    live.wait_until_processed(30, timeout_s=30)
    time.sleep(1)
    holders = [held_by(live, i) for i in ids]
    assert all(len(names) == 1 for names in holders), holders
    assert any(names == ["default"] for names in holders)  # some did time out there
    assert_ledgers_catch_up(live)
    stamps = sorted(live.default.held(i)["requestedAt"] for i in ids if holders[ids.index(i)] == ["default"])
    assert_ledgers_match_processors(live, f"?from={stamps[0]}&to={stamps[0]}")
    # Resends given up on are still sleeping inside the default: a purge now would
    # let them land in the next test's empty store.
    time.sleep(2.5)


def test_a_payment_the_processor_never_stored_goes_elsewhere_after_asking(impatient):
    live = impatient
    live.reset()
    live.default.set_delay(1500)
    ids = accept_all(live, 10, concurrency=10)
    time.sleep(0.2)
    # The attempts are still sleeping inside the default; it will store none of them.
    live.default.set_failure(True)
    processed = live.wait_until_processed(10, timeout_s=30)
    time.sleep(0.5)
    assert processed["default"]["totalRequests"] == 0
    assert all(held_by(live, i) == ["fallback"] for i in ids)
    assert_ledgers_catch_up(live)
