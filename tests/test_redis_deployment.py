"""Instances on separate "hosts" sharing only a real redis-server: one is
SIGKILLed mid-load and never restarted, and its payments are still processed
exactly once by the others."""
from __future__ import annotations

import signal
import time

import pytest
from conftest import call, quick_stack, random_uuid, test_random
from test_crash_safety import Load, assert_exactly_once, assert_load_paid_exactly_once
from test_service import payment

LEASE_MS = 1000


@pytest.fixture
def three_hosts():
    """Three instances, each with a shared directory of its own; processors
    that take a while, so the kill finds payments in flight."""
    with quick_stack(store="redis", instances=3, PAYCORE_STORE_LEASE_MS=str(LEASE_MS),
                     PAYCORE_REQUEST_TIMEOUT_MS="1500", PAYCORE_PIN_RELEASE_MS="2500") as live:
        yield live


def test_instances_share_nothing_but_the_store(three_hosts):
    live = three_hosts
    shared_dirs = {live.stack.instance_shared_dir(index) for index in live.stack.instances}
    assert len(shared_dirs) == 3
    correlation_id = str(random_uuid())
    assert call(live.instance(1), "POST", "/payments", payment(correlation_id))[0] == 202
    assert call(live.instance(3), "POST", "/payments", payment(correlation_id))[0] == 200
    assert call(live.instance(2), "POST", "/payments", payment(correlation_id, "20.06"))[0] == 409
    assert_exactly_once(live, [correlation_id])


def test_a_killed_instance_s_payments_are_taken_over_exactly_once(three_hosts):
    live = three_hosts
    live.default.set_delay(40)
    with Load(live) as load:
        time.sleep(test_random.uniform(2.0, 4.0))
        assert live.stack.stop_instance(1, signal.SIGKILL) == -signal.SIGKILL
        time.sleep(3.0)
    assert_load_paid_exactly_once(live, load)


def test_sends_in_the_air_at_the_kill_are_asked_about_before_anything_is_resent(three_hosts):
    live = three_hosts
    # Every send is in the air when the instance dies, and by the takeover the
    # survivors' own sends have waited long enough for the default to look too
    # slow: a payment taken over and sent again without asking would go to the
    # fallback while instance 1's send still lands at the default.
    live.default.set_delay(3000)
    ids = [str(random_uuid()) for _ in range(60)]
    for index, correlation_id in enumerate(ids):
        assert call(live.instance(index % 3 + 1), "POST", "/payments", payment(correlation_id))[0] == 202
    time.sleep(0.3)
    live.stack.stop_instance(1, signal.SIGKILL)
    time.sleep(LEASE_MS / 1000 + 2.0)
    live.default.set_delay(0)
    assert_exactly_once(live, ids)


def test_while_redis_is_down_new_payments_get_503_and_nothing_accepted_is_lost():
    with quick_stack(store="redis") as live:
        accepted = [str(random_uuid()) for _ in range(20)]
        for correlation_id in accepted:
            assert call(live.client(), "POST", "/payments", payment(correlation_id))[0] == 202
        live.stack.redis.stop()
        status, body = call(live.client(), "POST", "/payments", payment())
        assert (status, body) == (503, {"error": "payment store unavailable, retry shortly"})
        # Restarted from its append-only file: what it had is still pending or settled.
        live.stack.redis.start()
        deadline = time.monotonic() + 10
        later = str(random_uuid())
        while call(live.client(), "POST", "/payments", payment(later))[0] != 202:
            assert time.monotonic() < deadline, "payments still refused after Redis came back"
            time.sleep(0.1)
        assert_exactly_once(live, [*accepted, later])
