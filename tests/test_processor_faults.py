"""Processor faults, one at a time, between the service and real emulated processors:
whatever a processor or the network in between does, every accepted payment ends
up held by exactly one processor, both instances' ledgers equal what the
processors recorded, and no service process dies."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import TEST_EMULATOR_ARGS, RunningStack, quick_stack
from fault_proxy import Fault, FaultProxy
from test_service import accept_all, as_summary, assert_ledgers_match_processors
from test_unknown_outcomes import held_by

from paycore.emulator import EmulatorProcess

REQUEST_TIMEOUT_MS = 400
INSTANCE_ENV = {
    "PAYCORE_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS),
    # Short enough that a pinned payment's release (ask, then go elsewhere) happens here.
    "PAYCORE_PIN_RELEASE_MS": "1000",
}
FAULT_S = 1.5
SETTLE_S = 8.0


@dataclass
class FaultyStack:
    live: RunningStack
    default_proxy: FaultProxy
    fallback_proxy: FaultProxy


@pytest.fixture
def faulty() -> Iterator[FaultyStack]:
    """The real topology with a fault proxy in front of each emulated processor."""
    with (EmulatorProcess("--fee", "0.07", *TEST_EMULATOR_ARGS) as default,
          EmulatorProcess("--fee", "0.10", *TEST_EMULATOR_ARGS) as fallback,
          FaultProxy(default.url) as default_proxy, FaultProxy(fallback.url) as fallback_proxy,
          # The checks ask the emulators themselves, never through a fault.
          quick_stack((default_proxy.url, fallback_proxy.url), (default.url, fallback.url),
                      **INSTANCE_ENV) as live):
        yield FaultyStack(live, default_proxy, fallback_proxy)


def post_over(live: RunningStack, count: int, seconds: float, batches: int = 10) -> list[str]:
    """count fresh payments through the load balancer, in batches spread over `seconds`; all accepted."""
    ids: list[str] = []
    for _ in range(batches):
        ids += accept_all(live, count // batches, concurrency=10)
        time.sleep(seconds / batches)
    return ids


def post_through(faulty: FaultyStack, proxies: list[FaultProxy], fault: Fault,
                 count: int = 200) -> list[str]:
    """Post a quarter of the payments, turn the fault on while they are delivered,
    post the rest during the fault, then clear it; the ids posted."""
    ids = accept_all(faulty.live, count // 4)
    for proxy in proxies:
        proxy.set_fault(fault)
    ids += post_over(faulty.live, count - len(ids), FAULT_S)
    for proxy in proxies:
        proxy.set_fault(Fault.NONE)
        assert proxy.touched > 0, f"no request met {fault}"
    return ids


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Until condition() holds or the time is up; the assertions that follow say what is wrong."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def settled(live: RunningStack, expected: int) -> bool:
    processed = live.processors_summary()
    total = processed["default"]["totalRequests"] + processed["fallback"]["totalRequests"]
    return total >= expected and all(answer == as_summary(processed) for answer in live.summaries())


def assert_each_payment_held_once(live: RunningStack, ids: list[str],
                                  timeout_s: float = SETTLE_S) -> dict:
    wait_until(lambda: settled(live, len(ids)), timeout_s)
    assert all(process.poll() is None for process in live.stack.instances.values())
    assert live.stack.balancer.poll() is None
    not_held_once = {i: names for i in ids if len(names := held_by(live, i)) != 1}
    assert not not_held_once, f"{len(not_held_once)} payments not held by exactly one processor"
    summary = assert_ledgers_match_processors(live)
    assert summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"] == len(ids)
    return summary


@pytest.mark.parametrize("fault", [Fault.HANG, Fault.HANG_AFTER_FORWARDING],
                         ids=["never-forwarded", "forwarded"])
def test_default_hanging_past_the_timeout(faulty, fault):
    ids = post_through(faulty, [faulty.default_proxy], fault)
    assert_each_payment_held_once(faulty.live, ids)


@pytest.mark.parametrize("fault", [Fault.REFUSE, Fault.HANG_ON_CONNECT],
                         ids=["refused", "connect-hangs"])
def test_default_unreachable(faulty, fault):
    """What was in flight when the default went down may be recorded there, so it waits
    for the default; what could not even be sent goes to the fallback at once, not
    once the default is back."""
    live = faulty.live
    live.default.set_delay(200)
    in_flight = accept_all(live, 50)
    # The proxy keeps forwarding what it took before the fault: once one payment is
    # on its way, the default records it whatever happens to the connection.
    wait_until(lambda: faulty.default_proxy.forwarded_payments > 0, 2.0)
    faulty.default_proxy.set_fault(fault)
    during = post_over(live, 150, FAULT_S)

    def waiting_for_the_default() -> list[str]:
        return [i for i in during if live.fallback.held(i) is None]

    # A payment written to a pooled connection the default was closing at that
    # instant has an unknown outcome, and rightly waits for the default: a few
    # may. Without a connect timeout a fifth of them waited for minutes.
    wait_until(lambda: len(waiting_for_the_default()) <= len(during) // 20, 2.0)
    waiting = waiting_for_the_default()
    assert len(waiting) <= len(during) // 20, f"{len(waiting)} wait for the default"
    faulty.default_proxy.set_fault(Fault.NONE)
    summary = assert_each_payment_held_once(live, in_flight + during)
    assert summary["default"]["totalRequests"] > 0  # the outage did catch some in flight


def test_default_resetting_in_the_middle_of_its_answers(faulty):
    ids = post_through(faulty, [faulty.default_proxy], Fault.RESET_MID_RESPONSE)
    assert_each_payment_held_once(faulty.live, ids)


def test_both_processors_answering_429_to_every_payment(faulty):
    proxies = [faulty.default_proxy, faulty.fallback_proxy]
    ids = post_through(faulty, proxies, Fault.THROTTLE_PAYMENTS)
    assert_each_payment_held_once(faulty.live, ids)


def fail_default_for_a_while(faulty: FaultyStack, fault: Fault) -> list[str]:
    """With both health checks under the fault, the default fails and recovers: only
    the service's own requests can tell it so."""
    proxies = [faulty.default_proxy, faulty.fallback_proxy]
    ids = accept_all(faulty.live, 50)
    for proxy in proxies:
        proxy.set_fault(fault)
    faulty.live.default.set_failure(True)
    ids += post_over(faulty.live, 100, FAULT_S)
    faulty.live.default.set_failure(False)
    ids += post_over(faulty.live, 50, FAULT_S / 2)
    for proxy in proxies:
        proxy.set_fault(Fault.NONE)
        assert proxy.touched > 0, f"no request met {fault}"
    return ids


def default_back_once_health_answers(live: RunningStack) -> list[str]:
    """The default, seen failing by the service's own requests, is back in use once a
    health check answers again: the health poller outlived the fault."""
    ids: list[str] = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        ids += accept_all(live, 10)
        time.sleep(0.2)
        if any(live.default.held(i) for i in ids[-10:]):
            return ids
    raise AssertionError("the default is not used again after the health check came back")


def test_health_check_answering_429(faulty):
    ids = fail_default_for_a_while(faulty, Fault.HEALTH_THROTTLED)
    ids += default_back_once_health_answers(faulty.live)
    summary = assert_each_payment_held_once(faulty.live, ids)
    assert summary["fallback"]["totalRequests"] > 0


@pytest.mark.parametrize("delay_s", [REQUEST_TIMEOUT_MS / 2000, REQUEST_TIMEOUT_MS / 1000 * 2],
                         ids=["late", "past-the-timeout"])
def test_health_check_answering_slowly(faulty, delay_s):
    faulty.default_proxy.health_delay_s = faulty.fallback_proxy.health_delay_s = delay_s
    ids = fail_default_for_a_while(faulty, Fault.HEALTH_SLOW)
    ids += default_back_once_health_answers(faulty.live)
    summary = assert_each_payment_held_once(faulty.live, ids)
    assert summary["fallback"]["totalRequests"] > 0


def test_garbage_in_the_body_of_a_200_the_processor_recorded(faulty):
    """A 200 means recorded (SPEC §2), whatever its body: treating an unreadable one as a
    failure and sending the payment elsewhere would pay it twice."""
    ids = post_through(faulty, [faulty.default_proxy], Fault.GARBAGE_AFTER_FORWARDING)
    summary = assert_each_payment_held_once(faulty.live, ids)
    assert summary["default"]["totalRequests"] == len(ids)


def test_the_checks_catch_a_200_for_a_payment_nobody_recorded(faulty):
    """A 200 the processor never sent (from a misconfigured middlebox, say) is counted by
    the service, as the contract says a 200 must be; the checks above must see the gap."""
    ids = post_through(faulty, [faulty.default_proxy], Fault.GARBAGE_WITHOUT_FORWARDING)
    with pytest.raises(AssertionError, match="not held by exactly one processor"):
        assert_each_payment_held_once(faulty.live, ids, timeout_s=1.0)
    processed = as_summary(faulty.live.processors_summary())
    assert all(answer != processed for answer in faulty.live.summaries())
