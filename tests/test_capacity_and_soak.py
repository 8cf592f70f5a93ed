"""The capacity sweep (perf/capacity.py) and the soak (perf/soak.py): how they
step, bisect, judge saturation and stop early, with stand-in steps; and one
small real run of each against the production topology (no cgroups, so no
timing is judged: only what was accepted, recorded and reconciled)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

if shutil.which("gcc") is None:
    pytest.skip("gcc is needed to build the load generator and the processor emulator", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))

import capacity  # noqa: E402
import soak  # noqa: E402
from bench import Variant  # noqa: E402
from capacity import StepLimits  # noqa: E402
from native import build_tools  # noqa: E402

LIMITS = StepLimits(seconds=1.5, warmup_s=0.5, max_vus=20, max_p99_ms=10)
ON_DISK = Variant("embedded", "disk")


def made_up_step(rate: float, limits: StepLimits) -> dict:
    """A stack whose p99 exceeds the bound above 10,000/s and whose throughput tops out at 14,000/s."""
    accepted = min(rate, 14_000) * limits.seconds
    step = {"rate": rate, "offered": rate * limits.seconds, "accepted": accepted,
            "settled_during_load": accepted, "refused_total": 0,
            "latency_ms": {"p99": 2.0 if rate <= 10_000 else 50.0}}
    step["throughput_saturated"] = capacity.throughput_saturation(step)
    step["saturated"] = capacity.saturation(step, limits)
    return step


@pytest.fixture
def tried(monkeypatch) -> list[float]:
    """The rates the sweep ran, each step made up (made_up_step)."""
    rates: list[float] = []

    def run_step(tools, jail, rate, limits, variant):
        rates.append(rate)
        return made_up_step(rate, limits)

    monkeypatch.setattr(capacity, "run_step", run_step)
    monkeypatch.setattr(capacity, "print_step", lambda step, header=False: None)
    return rates


def test_the_sweep_steps_up_until_the_throughput_saturates_then_bisects_for_the_knee(tried):
    steps = capacity.sweep({}, None, [600, 3000, 6000, 12000], LIMITS, ON_DISK, True, [])
    # 12,000 is past the p99 bound but takes everything: stepping up goes on to 15,000
    assert tried == [600, 3000, 6000, 12000, 15000, 9000, 10500]
    assert [step["rate"] for step in steps] == sorted(tried)
    assert capacity.knee(steps)["rate"] == 9000
    assert steps[-1]["throughput_saturated"] == ["accepted 93.3% of offered"]


def test_without_the_search_only_the_rates_given_run_each_as_often_as_given(tried):
    steps = capacity.sweep({}, None, [6000, 6000, 6000], LIMITS, ON_DISK, False, [])
    assert tried == [6000, 6000, 6000]
    assert len(steps) == 3


def test_what_saturates_a_step():
    step = {"offered": 1000, "accepted": 990, "settled_during_load": 900, "refused_total": 3,
            "latency_ms": {"p99": 12.5}}
    step["throughput_saturated"] = capacity.throughput_saturation(step)
    assert capacity.saturation(step, LIMITS) == ["p99 12.5 ms > 10 ms", "3 refused",
                                                 "settled 90.9% of accepted during the load"]
    step.update(settled_during_load=990, refused_total=0, latency_ms={"p99": 0.4})
    step["throughput_saturated"] = capacity.throughput_saturation(step)
    assert capacity.saturation(step, LIMITS) == []


def test_the_soak_stops_when_most_of_what_was_offered_over_30_s_was_not_accepted():
    def at(second, offered, accepted, refused):
        return {"load_t_s": second, "offered": offered, "accepted": accepted, "refused_total": refused,
                "refused": {"503 accepted-payment registry is full": refused} if refused else {},
                "failed": 0, "dropped": 0, "exited": {}}

    samples = [at(0, 0, 0, 0), at(10, 10_000, 10_000, 0), at(20, 20_000, 20_000, 0)]
    assert soak.early_stop_reason(samples) is None  # not 30 s of samples yet
    samples.append(at(40, 40_000, 25_000, 15_000))
    assert soak.early_stop_reason(samples) is None  # 15,000 of 30,000 since 10 s: half
    samples.append(at(50, 50_000, 25_000, 25_000))
    reason = soak.early_stop_reason(samples)
    assert reason.startswith("5,000 of 30,000 payments offered over the last 30 s were accepted")
    assert "'503 accepted-payment registry is full': 25000" in reason


def test_growth_is_the_slope_of_bytes_over_payments():
    samples = [{"accepted": n, "rss_bytes": {"api1": 1_000_000 + 3 * n}, "storage_bytes": {"tmpfs": 50 * n}}
               for n in range(0, 100_001, 10_000)]
    assert soak.growth(samples) == {"rss api1": 3.0, "rss stack": 3.0, "tmpfs": 50.0}


def test_a_restart_that_fails_is_reported_not_raised():
    class StackWhoseInstanceDiesAtStart:
        def stop_instance(self, index, signum):
            pass

        def start_instance(self, index):
            raise RuntimeError("python -m paycore.service exited with -9 before listening")

    restart = soak.restart_instance(StackWhoseInstanceDiesAtStart(), 1)
    assert restart["serving_after_s"] is None and "exited with -9" in restart["error"]


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return build_tools()


@pytest.mark.parametrize("data", ["disk", "tmpfs"])
def test_a_capacity_step_against_the_stack(tools, data):
    step = capacity.run_step(tools, None, 300, StepLimits(seconds=1.5, warmup_s=0.5, max_vus=100, max_p99_ms=1000),
                             Variant("embedded", data))
    assert step["data"] == data
    assert step["offered"] == step["accepted"] == 450
    assert step["refused_total"] == step["dropped"] == step["failed"] == 0
    assert step["warmup_accepted"] == 150
    assert step["settled_after_load_s"] is not None  # the processors hold all 600
    assert step["stack_cpu_ms_per_payment"] > 0
    assert set(step["stack"]) == {"load-balancer", "api1", "api2"}
    assert all(usage["peak_rss_mb"] > 0 for usage in step["stack"].values())


def test_a_short_soak_restarts_an_instance_and_reconciles(tools):
    result: dict = {"samples": []}
    soak.soak(tools, None, payments=1_500, rate=500, sample_s=0.5, max_vus=100, result=result)
    assert result["generator"]["ok_2xx"] == 1_500 and "stopped_early" not in result
    assert result["restart"]["serving_after_s"] is not None
    reconciliation = result["reconciliation"]
    assert reconciliation["summary_matches_processors"] and reconciliation["not_recorded"] == 0
    assert reconciliation["recorded"] == 1_500
    assert len(result["samples"]) >= 3
    assert set(result["after_restart"]["rss_bytes"]) == {"load-balancer", "api1", "api2"}
    assert None not in result["after_restart"]["rss_bytes"].values()
    assert set(result["samples"][-1]["storage_bytes"]) == {"tmpfs", "disk"}
    assert result["samples"][-1]["cgroup_memory_bytes"] == {}  # no cgroups here
