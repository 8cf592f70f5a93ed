"""The routing rule on its own, with the clock under the test's control."""
from __future__ import annotations

import pytest

from paycore.service import router as router_module
from paycore.service.metrics import Metrics
from paycore.service.processor_client import Outcome, ProcessorHealth
from paycore.service.router import DEFAULT, FALLBACK, Router


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(router_module, "_now_ms", lambda: now[0])
    return now


def answered(router: Router, processor: int, latency_ms: float, clock, outcome=Outcome.PROCESSED) -> None:
    ticket = router.start(processor)
    clock[0] += latency_ms
    router.end(processor, ticket, outcome)


def test_default_while_healthy_and_fast(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    assert router.choose() == DEFAULT
    answered(router, DEFAULT, 1000, clock)  # slow but within the limit: still cheaper
    assert router.choose() == DEFAULT


def test_failing_default_goes_to_fallback_and_back_on_health(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    answered(router, DEFAULT, 5, clock, Outcome.FAILED)
    assert router.choose() == FALLBACK
    clock[0] += 100
    router.processors[DEFAULT].apply_health(ProcessorHealth(False, 0), clock[0])
    assert router.choose() == DEFAULT


def test_stale_health_report_does_not_override_a_newer_observation(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    report_time = clock[0]
    clock[0] += 50
    answered(router, DEFAULT, 5, clock, Outcome.FAILED)
    router.processors[DEFAULT].apply_health(ProcessorHealth(False, 0), report_time)
    assert router.choose() == FALLBACK


def test_slow_default_loses_to_faster_fallback(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    router.processors[DEFAULT].apply_health(ProcessorHealth(False, 2000), clock[0])
    router.processors[FALLBACK].apply_health(ProcessorHealth(False, 0), clock[0])
    assert router.choose() == FALLBACK


def test_slow_default_still_beats_a_failing_or_slower_fallback(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    router.processors[DEFAULT].apply_health(ProcessorHealth(False, 2000), clock[0])
    router.processors[FALLBACK].apply_health(ProcessorHealth(True, 0), clock[0])
    assert router.choose() == DEFAULT
    router.processors[FALLBACK].apply_health(ProcessorHealth(False, 3000), clock[0])
    assert router.choose() == DEFAULT


def test_sudden_slowdown_is_noticed_before_the_first_slow_answer(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    answered(router, DEFAULT, 3, clock)
    router.start(DEFAULT)  # this one will take 2 s
    clock[0] += 150
    assert router.choose() == DEFAULT  # jitter, not yet a slowdown
    clock[0] += 100
    assert router.choose() == FALLBACK  # 250 ms > 3 ms usual + 200 ms


def test_both_failing_means_wait_and_probe_the_oldest_failure(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    answered(router, DEFAULT, 5, clock, Outcome.FAILED)
    answered(router, FALLBACK, 5, clock, Outcome.THROTTLED)
    assert router.choose() is None
    assert router.probe_target() == DEFAULT
    answered(router, DEFAULT, 5, clock)
    assert router.choose() == DEFAULT


def test_timeout_is_not_a_failure_but_a_latency(clock):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    answered(router, DEFAULT, 6000, clock, Outcome.UNKNOWN)
    assert not router.processors[DEFAULT].failing
    assert router.choose() == FALLBACK


def test_a_routing_change_is_logged_once_with_its_reason(clock, caplog):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    with caplog.at_level("INFO", logger="paycore.router"):
        for _ in range(5):
            router.choose()
        answered(router, DEFAULT, 5, clock, Outcome.FAILED)
        for _ in range(5):
            router.choose()
        router.processors[DEFAULT].apply_health(ProcessorHealth(False, 0), clock[0] + 1)
        for _ in range(5):
            router.choose()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["routing default -> fallback: default failing",
                        "routing fallback -> default: default healthy and fast enough"]


def test_a_slow_default_is_logged_with_its_expected_latency(clock, caplog):
    router = Router(default_max_latency_ms=1500, metrics=Metrics())
    router.processors[DEFAULT].apply_health(ProcessorHealth(False, 2000), clock[0])
    router.processors[FALLBACK].apply_health(ProcessorHealth(False, 0), clock[0])
    with caplog.at_level("INFO", logger="paycore.router"):
        router.choose()
    assert [record.getMessage() for record in caplog.records] == [
        "routing default -> fallback: default slow (expected 2000 ms), fallback faster"]
