"""make bench-capacity: payments accepted and settled per second against the
rate offered, open loop, up to saturation.

Each step offers fresh payments at a constant arrival rate (k6's
constant-arrival-rate: one starts every 1/rate s whatever the answers, on a
pool of keep-alive connections that grows up to CAPACITY_MAX_VUS, default
1000; one that finds no free connection is dropped) for CAPACITY_SECONDS
(default 30) to a fresh production topology under the compose file's limits,
the processors emulated in C and answering at once (perf/topology.py). The
first CAPACITY_WARMUP_S (default 3) of each step, at the same rate, open the
connections and warm the stack and are not recorded.
Rates: CAPACITY_RATES (default 600,3000,6000,12000: 1x, 5x, 10x and 20x the
final round's peak), then 1.25 times more until the throughput saturates,
then two bisections between the highest rate that held and the lowest that
did not; CAPACITY_SEARCH=0 runs the rates given and nothing more (a rate
given three times: three runs of it, for a median).

A step saturates when the p99 of accepted requests exceeded
CAPACITY_MAX_P99_MS (default 10), any request was refused, or the throughput
saturated: the stack accepted under 95 % of what was offered, or the
processors recorded under 95 % of what was accepted while the load ran (the
backlog grows). The knee is the highest rate that held below the lowest that
did not.

Per step: offered, accepted/s, settled/s (what the processors recorded with a
requestedAt in the recorded seconds), p50/p99/p99.9 of accepted requests (all,
and on reused connections), refusals by reason, dropped and failed requests,
how long after the load the processors held every accepted payment, the
stack's CPU ms per payment (over the whole step, warm-up and settling
included, per payment accepted), peak RSS per process, the emulated
processors' CPU and the generator's lag.
CAPACITY_DATA: disk (the default: the data directory on disk, synced per
batch, as docker-compose.yml deploys it) or tmpfs (no syncs: what the stack
does when the disk's flush is not in the way).
Writes perf/results/capacity-<time>.json and .png and prints the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import Variant  # noqa: E402
from cgroups import CgroupJail, compose_jail  # noqa: E402
from native import build_tools  # noqa: E402
from open_loop import OpenLoopLoad, refusals  # noqa: E402
from report import latencies_by_connection_ms, read_requests, success_latencies_ms  # noqa: E402
from stop_signals import stop_on_first_signal  # noqa: E402
from topology import FastTopology  # noqa: E402
from usage import process_usage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "perf" / "results"
DEFAULT_RATES = "600,3000,6000,12000"
STEP_UP = 1.25
BISECTIONS = 2
MAX_RATE = 500_000
PRE_ALLOCATED_VUS = 100
HELD_SHARE = 0.95
SETTLE_TIMEOUT_S = 120.0
SETTLED_STEADY_S = 0.5


@dataclass(frozen=True)
class StepLimits:
    seconds: float
    warmup_s: float
    max_vus: int
    max_p99_ms: float

    @staticmethod
    def from_environment(prefix: str, seconds: float) -> StepLimits:
        return StepLimits(seconds=float(os.environ.get(f"{prefix}_SECONDS", seconds)),
                          warmup_s=float(os.environ.get(f"{prefix}_WARMUP_S", 3)),
                          max_vus=int(os.environ.get(f"{prefix}_MAX_VUS", 1000)),
                          max_p99_ms=float(os.environ.get(f"{prefix}_MAX_P99_MS", 10)))


def wait_until_settled(topology: FastTopology, accepted: int, load_ended: float) -> float | None:
    """Seconds after the load until the processors held every accepted payment (None:
    not within SETTLE_TIMEOUT_S); returns once their count has also stopped moving, since
    requests the generator gave up on may have been accepted too."""
    settled_after = None
    last_count, steady_since = -1, time.monotonic()
    while time.monotonic() - load_ended < SETTLE_TIMEOUT_S:
        count = topology.processed_count()
        now = time.monotonic()
        if count >= accepted and settled_after is None:
            settled_after = now - load_ended
        if count != last_count:
            last_count, steady_since = count, now
        elif settled_after is not None and now - steady_since >= SETTLED_STEADY_S:
            break
        time.sleep(0.05)
    return settled_after


def throughput_saturation(step: dict) -> list[str]:
    reasons = []
    if step["accepted"] < HELD_SHARE * step["offered"]:
        reasons.append(f"accepted {step['accepted'] / step['offered']:.1%} of offered")
    if step["settled_during_load"] < HELD_SHARE * step["accepted"]:
        share = step["settled_during_load"] / step["accepted"] if step["accepted"] else 0
        reasons.append(f"settled {share:.1%} of accepted during the load")
    return reasons


def saturation(step: dict, limits: StepLimits) -> list[str]:
    reasons = []
    p99 = step["latency_ms"]["p99"]
    if p99 > limits.max_p99_ms:
        reasons.append(f"p99 {p99:.1f} ms > {limits.max_p99_ms:g} ms")
    if step["refused_total"]:
        reasons.append(f"{step['refused_total']} refused")
    return reasons + step["throughput_saturated"]


def run_step(tools: dict[str, Path], jail: CgroupJail | None, rate: float, limits: StepLimits,
             variant: Variant) -> dict:
    expected = int(rate * (limits.warmup_s + limits.seconds) * 1.2) + 10_000
    with tempfile.TemporaryDirectory(prefix="paycore-capacity-") as scratch, variant.instance_env() as data_env, \
            FastTopology(tools["processor"], jail, expected, data_env) as topology:
        if jail:
            jail.reset_memory_peaks()
        # the cgroups outlive each step; starting Python under a small quota is throttled too
        cgroup_before = jail.usage() if jail else {}
        stack_pids = {name: process.pid for name, process in topology.stack_processes().items()}
        processor_pids = topology.processor_pids()
        pids = {**stack_pids, **processor_pids}
        cpu_before = {name: process_usage(pid)[0] for name, pid in pids.items()}
        requests_csv = Path(scratch) / "requests.csv"
        load = OpenLoopLoad(tools["loadgen"], topology.stack.port, rate, limits.seconds,
                            limits.max_vus, PRE_ALLOCATED_VUS, requests_csv, limits.warmup_s)
        generator = load.wait()
        load_ended = time.monotonic()
        all_accepted = generator["warmup_ok_2xx"] + generator["ok_2xx"]
        settled_after_s = wait_until_settled(topology, all_accepted, load_ended)
        window_start_ms = generator["origin_unix_ms"]
        settled_during_load = sum(report["totalRequests"] for report in topology.admin.summary(
            window_start_ms, window_start_ms + int(limits.seconds * 1000) - 1).values())
        usage = {name: process_usage(pid) for name, pid in pids.items()}
        cgroup_usage = jail.usage() if jail else {}
        requests = read_requests(requests_csv)
    latency, _ = success_latencies_ms(requests)
    by_connection = latencies_by_connection_ms(requests)
    accepted = generator["ok_2xx"]
    cpu_s = {name: usage[name][0] - cpu_before[name] for name in pids}
    stack_cpu_s = sum(cpu_s[name] for name in stack_pids)
    step = {
        "rate": rate, "seconds": limits.seconds, "data": variant.journal,
        "offered": generator["started"] + generator["dropped"],
        "accepted": accepted, "accepted_per_s": round(accepted / limits.seconds, 1),
        "settled_during_load": settled_during_load,
        "settled_per_s": round(settled_during_load / limits.seconds, 1),
        "settled_after_load_s": None if settled_after_s is None else round(settled_after_s, 2),
        "refused_total": generator["other_status"], "refused": refusals(generator["answers"]),
        "dropped": generator["dropped"], "failed": generator["failed"],
        "latency_ms": latency,
        "latency_ms_reused_connection": by_connection["reused_connection"],
        "new_connections": sum(1 for request in requests if request.new_connection),
        "stack_cpu_s": round(stack_cpu_s, 2),
        "stack_cpu_ms_per_payment": round(stack_cpu_s * 1000 / all_accepted, 4) if all_accepted else None,
        "stack": {name: {"cpu_s": round(cpu_s[name], 2), "peak_rss_mb": round(usage[name][1] / 2**20, 1),
                         **({"throttled_periods": cgroup_usage[name]["throttled_periods"]
                             - cgroup_before[name]["throttled_periods"],
                             "cgroup_memory_peak_mb": round(cgroup_usage[name]["memory_peak_bytes"] / 2**20, 1)}
                            if name in cgroup_usage else {})}
                  for name in stack_pids},
        "stack_peak_rss_mb": round(sum(usage[name][1] for name in stack_pids) / 2**20, 1),
        "processors": {name: {"cpu_s": round(cpu_s[name], 2)} for name in processor_pids},
        "warmup_accepted": generator["warmup_ok_2xx"],
        "generator": {"cpu_s": round(generator["cpu_user_s"] + generator["cpu_sys_s"], 2),
                      "max_start_lag_ms": generator["max_start_lag_us"] / 1000, "vus": generator["vus"]},
    }
    step["throughput_saturated"] = throughput_saturation(step)
    step["saturated"] = saturation(step, limits)
    return step


def knee(steps: list[dict]) -> dict | None:
    """The highest rate that held below the lowest that did not."""
    broke = min((step["rate"] for step in steps if step["saturated"]), default=None)
    held = [step for step in steps if not step["saturated"] and (broke is None or step["rate"] < broke)]
    return max(held, key=lambda step: step["rate"], default=None)


def sweep(tools: dict[str, Path], jail: CgroupJail | None, rates: list[float], limits: StepLimits,
          variant: Variant, search: bool, steps: list[dict]) -> list[dict]:
    """Runs the rates given, then (search) steps up until the throughput saturates, then
    bisects for the knee; each step is appended to steps as it finishes (so an interrupted
    sweep keeps what it did)."""
    def run(rate: float) -> dict:
        step = run_step(tools, jail, rate, limits, variant)
        steps.append(step)
        print_step(step, header=len(steps) == 1)
        return step

    for rate in rates:
        run(rate)
    if not search:
        return sorted(steps, key=lambda step: step["rate"])
    rate = rates[-1]
    while not any(step["throughput_saturated"] for step in steps) and rate * STEP_UP <= MAX_RATE:
        rate = round(rate * STEP_UP, -2)
        run(rate)
    for _ in range(BISECTIONS):
        held = knee(steps)
        broke = min((step["rate"] for step in steps if step["saturated"]), default=None)
        if held is None or broke is None:
            break
        middle = round((held["rate"] + broke) / 2, -2)
        if middle in (held["rate"], broke):
            break
        run(middle)
    return sorted(steps, key=lambda step: step["rate"])


def print_step(step: dict, header: bool = False) -> None:
    if header:
        print(f"{'offered/s':>9} {'accepted/s':>10} {'settled/s':>9} {'p50':>7} {'p99':>7} {'p99.9':>7} "
              f"{'refused':>7} {'dropped':>7} {'failed':>6} {'CPU ms/pay':>10} {'RSS MB':>6} {'settle s':>8} "
              f"{'gen lag ms':>10}  saturated")
    latency = step["latency_ms"]
    cpu = step["stack_cpu_ms_per_payment"]
    settled_after = step["settled_after_load_s"]
    print(f"{step['rate']:>9,.0f} {step['accepted_per_s']:>10,.0f} {step['settled_per_s']:>9,.0f} "
          f"{latency['p50']:>7.3f} {latency['p99']:>7.3f} {latency['p99.9']:>7.3f} {step['refused_total']:>7} "
          f"{step['dropped']:>7} {step['failed']:>6} {cpu if cpu is not None else '-':>10} "
          f"{step['stack_peak_rss_mb']:>6} {settled_after if settled_after is not None else '-':>8} "
          f"{step['generator']['max_start_lag_ms']:>10.1f}  {'; '.join(step['saturated']) or 'no'}", flush=True)


def draw_chart(path: Path, steps: list[dict], best: dict | None, limits: StepLimits, variant: Variant) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [step["rate"] for step in steps]
    figure, (throughput, latency, cost) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    throughput.plot(rates, rates, color="grey", linestyle=":", label="offered")
    throughput.plot(rates, [step["accepted_per_s"] for step in steps], marker="o", label="accepted/s")
    throughput.plot(rates, [step["settled_per_s"] for step in steps], marker="x", label="settled/s (processors)")
    throughput.set_ylabel("payments per second")
    throughput.set_title(f"open-loop capacity, {limits.seconds:g} s per rate, under the compose limits; {variant.name}")
    for name, key in (("p50", "p50"), ("p99", "p99"), ("p99.9", "p99.9")):
        latency.plot(rates, [step["latency_ms"][key] for step in steps], marker="o", label=name)
    latency.axhline(limits.max_p99_ms, color="red", linestyle=":", label=f"p99 bound {limits.max_p99_ms:g} ms")
    latency.set_yscale("log")
    latency.set_ylabel("POST /payments latency (ms)")
    cost.plot(rates, [step["stack_cpu_ms_per_payment"] for step in steps], marker="o", color="tab:purple",
              label="stack CPU ms per payment")
    cost.set_ylabel("CPU ms per payment")
    rss = cost.twinx()
    rss.plot(rates, [step["stack_peak_rss_mb"] for step in steps], marker="s", color="tab:brown",
             label="stack peak RSS (MB)")
    rss.set_ylabel("MB")
    cost.set_xlabel("offered payments per second")
    for axis in (throughput, latency, cost):
        if best is not None:
            axis.axvline(best["rate"], color="green", linewidth=0.8, label="knee" if axis is throughput else None)
        axis.legend(loc="upper left")
    rss.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def commit() -> str:
    finished = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True)
    return finished.stdout.strip() or "unknown"


def main() -> int:
    stop_on_first_signal()
    limits = StepLimits.from_environment("CAPACITY", 30)
    rates = [float(rate) for rate in os.environ.get("CAPACITY_RATES", DEFAULT_RATES).split(",")]
    variant = Variant("embedded", os.environ.get("CAPACITY_DATA", "disk"))
    tools = build_tools()
    jail = compose_jail(REPO / "docker-compose.yml", "paycore-capacity")
    steps: list[dict] = []
    interrupted = False
    try:
        print(f"data directory: {variant.name}", flush=True)
        sweep(tools, jail, rates, limits, variant, os.environ.get("CAPACITY_SEARCH", "1") != "0", steps)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the steps done", file=sys.stderr)
    finally:
        if jail:
            jail.close()
    steps.sort(key=lambda step: step["rate"])
    best = knee(steps)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"capacity-{stamp}.json"
    out.write_text(json.dumps({
        "commit": commit(), "cpus": os.cpu_count(), "limits": limits.__dict__, "cgroups": jail is not None,
        "data": variant.journal, "interrupted": interrupted, "knee": best, "steps": steps}, indent=2))
    if steps:
        draw_chart(out.with_suffix(".png"), steps, best, limits, variant)
        print(f"\nresults: {out} (+ .png)")
        for index, step in enumerate(steps):
            print_step(step, header=index == 0)
    if best is not None:
        print(f"knee: {best['rate']:,.0f} offered/s held ({best['accepted_per_s']:,.0f} accepted/s, "
              f"p99 {best['latency_ms']['p99']:.3f} ms, {best['stack_cpu_ms_per_payment']} CPU ms per payment)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
