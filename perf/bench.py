"""make bench: the final round of SPEC §4 against the production topology.

The load balancer in front of two instances, as docker-compose.yml runs them,
each service held by cgroups to the limits the compose file declares; emulated processors and
the load generator outside the budget, as in the challenge. First the same load
runs against a constant-response server: the generator's floor, whose p99 each
round is compared with (BENCH_FLOOR=0 skips it). While a round runs, the
instances' metrics are scraped once a second (service_events.py). Writes
perf/results/bench-<time>.json and .png (latency per 10 s window beside the
floor's, the events marked, what the instances did per second, where payments
were recorded), and prints the table.

BENCH_SECONDS=60 shortens a run (the fault schedule scales with it).
BENCH_FLAMEGRAPH=1 records py-spy flamegraphs of both instances under perf/flamegraphs/.
BENCH_LOW_LATENCY_HOST=1 keeps idle CPUs polling during the run (perf/host.py; root).
BENCH_JOURNAL=disk,tmpfs (the default) runs the embedded store twice, one run
after the other, and prints them side by side: its data directory (journals,
payments record) on disk with a sync per batch, as docker-compose.yml deploys
it, then on tmpfs without syncs; BENCH_JOURNAL=disk runs the first only.
BENCH_STORE=redis runs the instances on the Redis store (a local redis-server,
outside the budget, its usage reported apart); BENCH_STORE=embedded,redis runs
both.
`bench.py --calibrate` runs the same load against a constant-response server:
the generator's own latency floor.

Exit status: 0 when no request failed, no check found an inconsistency and
nothing was left behind at teardown; 1 otherwise.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

from cgroups import compose_jail, compose_limits  # noqa: E402
from host import LowLatencyHost  # noqa: E402
from native import BUILD, build_tools  # noqa: E402
from report import (  # noqa: E402
    LATENCY_WINDOW_S,
    Request,
    draw_chart,
    latencies_by_connection_ms,
    latency_summary_ms,
    read_requests,
    score,
    success_latencies_ms,
    window_percentiles,
)
from scenario import FULL_RUN_S, Processors, Scenario, now_ms  # noqa: E402
from service_events import MetricsSampler  # noqa: E402
from stop_signals import stop_on_first_signal  # noqa: E402
from usage import process_usage  # noqa: E402

from paycore.stack import Stack, StackSettings  # noqa: E402

RESULTS = REPO / "perf" / "results"
FLAMEGRAPHS = REPO / "perf" / "flamegraphs"
MAX_VUS = 603
TMPFS = Path("/dev/shm")


@dataclass(frozen=True)
class Variant:
    """What one run of the round measures: the store, and for the embedded
    store where its data directory lives and whether each batch is synced."""

    store: str
    journal: str = ""  # "disk" (synced) or "tmpfs"; "" for Redis

    @property
    def name(self) -> str:
        return {"disk": "embedded, disk + sync", "tmpfs": "embedded, tmpfs"}.get(self.journal, self.store)

    @contextlib.contextmanager
    def instance_env(self):
        if not self.journal:
            yield {}
            return
        parent = TMPFS if self.journal == "tmpfs" else BUILD
        parent.mkdir(exist_ok=True)
        data_dir = tempfile.mkdtemp(prefix="bench-data-", dir=parent)
        try:
            yield {"PAYCORE_DATA_DIR": data_dir, "PAYCORE_JOURNAL_SYNC": "1" if self.journal == "disk" else "0"}
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


def variants() -> list[Variant]:
    journals = os.environ.get("BENCH_JOURNAL", "disk,tmpfs").split(",")
    return [variant for store in os.environ.get("BENCH_STORE", "embedded").split(",")
            for variant in ([Variant(store, journal) for journal in journals] if store == "embedded"
                            else [Variant(store)])]



def run_load(loadgen: Path, port: int, seconds: float, out: Path) -> dict:
    command = [str(loadgen), "--target", f"127.0.0.1:{port}", "--duration", f"{seconds:g}",
               "--max-vus", str(MAX_VUS), "--out", str(out)]
    finished = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def measure_floor(seconds: float) -> tuple[list[Request], dict]:
    """The same load against a constant-response server: the generator's
    own latency floor, its requests and their summary."""
    tools = build_tools()
    server = subprocess.Popen([str(tools["constant_server"]), "--listen", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        ready = server.stderr.readline()
        if not ready.startswith("listening on "):
            raise RuntimeError(f"the constant server did not start: {ready!r}")
        port = int(ready.rsplit(":", 1)[1])
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / "calibration-requests.csv"
        generator = run_load(tools["loadgen"], port, seconds, out)
    finally:
        server.terminate()
        server.wait()
    requests = read_requests(out)
    arrival, read = success_latencies_ms(requests)
    return requests, {"target": "constant-response server", "seconds": seconds, "requests": len(requests),
                      "rps": round(len(requests) / seconds, 1), "latency_ms": arrival, "read_latency_ms": read,
                      "generator_cpu_s": round(generator["cpu_user_s"] + generator["cpu_sys_s"], 2)}


def calibrate(seconds: float, low_latency_host: bool) -> None:
    _, summary = measure_floor(seconds)
    summary["low_latency_host"] = low_latency_host
    (RESULTS / "calibration.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def start_flamegraphs(stack: Stack, seconds: float) -> list[subprocess.Popen]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    FLAMEGRAPHS.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([py_spy, "record", "--nonblocking", "--rate", "200",
                              "--duration", str(int(seconds)), "--pid", str(process.pid),
                              "--output", str(FLAMEGRAPHS / f"api{index}.svg")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for index, process in stack.instances.items()]


def main() -> int:
    stop_on_first_signal()
    seconds = float(os.environ.get("BENCH_SECONDS", FULL_RUN_S))
    low_latency_host = os.environ.get("BENCH_LOW_LATENCY_HOST") == "1"
    with LowLatencyHost() if low_latency_host else contextlib.nullcontext():
        if "--calibrate" in sys.argv:
            calibrate(seconds, low_latency_host)
            return 0
        floor: list[Request] = []
        if os.environ.get("BENCH_FLOOR", "1") != "0":
            print("round: the generator's floor (constant-response server)", flush=True)
            floor, floor_summary = measure_floor(seconds)
            print(f"floor: p50 {floor_summary['latency_ms']['p50']:.3f}  p99 {floor_summary['latency_ms']['p99']:.3f}"
                  f"  p99.9 {floor_summary['latency_ms']['p99.9']:.3f} ms", flush=True)
        runs = [benchmark(seconds, low_latency_host, variant, floor) for variant in variants()]
        if len(runs) > 1:
            print_side_by_side(runs)
        return max(status for status, _ in runs)


def benchmark(seconds: float, low_latency_host: bool, variant: Variant,
              floor: list[Request]) -> tuple[int, dict]:
    with variant.instance_env() as data_env:
        return _benchmark(seconds, low_latency_host, variant, data_env, floor)


def _benchmark(seconds: float, low_latency_host: bool, variant: Variant,
               data_env: dict[str, str], floor: list[Request]) -> tuple[int, dict]:
    print(f"round: {variant.name}", flush=True)
    tools = build_tools()
    limits = compose_limits(REPO / "docker-compose.yml")
    jail = compose_jail(REPO / "docker-compose.yml", "paycore-bench")
    settings = StackSettings(port=0, default_port=0, fallback_port=0, quiet=True,
                             cgroups=jail.directories if jail else {},
                             instance_env={"PAYCORE_LOG_LEVEL": "WARNING", **data_env}, store=variant.store)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    requests_csv = RESULTS / f"bench-{stamp}-requests.csv"
    try:
        with Stack(settings) as stack:
            processors = Processors(stack.default_url, stack.fallback_url)
            processors.purge()
            scenario = Scenario(processors, stack.url, seconds, stack.settings.admin_token)
            scenario.purge_service()
            stack_processes = {"load-balancer": stack.balancer,
                               **{f"api{i}": p for i, p in stack.instances.items()},
                               **({"redis": stack.redis.process} if stack.redis else {})}
            # The emulated processors share the machine's CPUs with the stack, so their cost is
            # reported beside it.
            harness_processes = dict(zip(("default-processor", "fallback-processor"), stack.processors))
            measured = {**stack_processes, **harness_processes}
            cpu_before = {name: process_usage(p.pid)[0] for name, p in measured.items()}
            profilers = start_flamegraphs(stack, seconds) if os.environ.get("BENCH_FLAMEGRAPH") else []
            sampler = MetricsSampler([str(stack.instance_shared_dir(index) / f"metrics-{index}.sock")
                                      for index in stack.instances])
            sampler.start()
            load_started_ms = now_ms()
            scenario.start(time.monotonic())
            generator = run_load(tools["loadgen"], stack.port, seconds, requests_csv)
            load_ended = time.monotonic()
            scenario.stop()
            events = sampler.stop()
            # The challenge reads the processors' totals about 1 s after the load.
            time.sleep(max(0.0, load_ended + 1 - time.monotonic()))
            at_teardown = processors.summary()
            requests = read_requests(requests_csv)
            successful = sum(1 for request in requests if request.succeeded)
            lag_zero_after_s = None
            while time.monotonic() - load_ended < 5:
                recorded = sum(r["totalRequests"] for r in processors.summary().values())
                if recorded >= successful:
                    lag_zero_after_s = round(time.monotonic() - load_ended, 2)
                    break
                time.sleep(0.1)
            usage = {name: process_usage(p.pid) for name, p in measured.items()}
            cgroup_usage = jail.usage() if jail else {}
            for profiler in profilers:
                profiler.wait()
            final_service = scenario.service_summary()
            final_processors = processors.summary()
            stage_shares = [{
                "from_s": round((stage.started_ms - load_started_ms) / 1000, 1),
                "default": stage.default, "fallback": stage.fallback,
                "recorded": {name: report["totalRequests"] for name, report in
                             processors.summary(stage.started_ms, (stage.ended_ms or now_ms()) - 1).items()},
            } for stage in scenario.log.stages]
            bucket_s = max(1.0, seconds / 60)
            shares = []
            for index in range(int(seconds / bucket_s) + 1):
                start = load_started_ms + int(index * bucket_s * 1000)
                window = processors.summary(start, start + int(bucket_s * 1000) - 1)
                shares.append((index * bucket_s, window["default"]["totalRequests"],
                               window["fallback"]["totalRequests"]))
    finally:
        if jail:
            jail.close()

    latency, read_latency = success_latencies_ms(requests)
    inconsistencies = sum(check["inconsistencies"] if check["inconsistencies"] is not None else 1
                          for check in scenario.log.checks)
    result = score(latency["p99"], at_teardown, inconsistencies, successful)
    cpu_s = {name: round(usage[name][0] - cpu_before[name], 2) for name in measured}
    service_calls = {name: latency_summary_ms([int(s * 1e6) for s in values])
                     for name, values in scenario.log.service_call_seconds.items() if values}
    result["paycore"] = {
        "seconds": seconds, "low_latency_host": low_latency_host, "store": variant.store,
        "variant": variant.name,
        "requests": len(requests), "successful": successful,
        "failed": len(requests) - successful, "rps": round(len(requests) / seconds, 1),
        "post_latency_ms": latency, "post_read_latency_ms": read_latency,
        "post_latency_ms_by_connection": latencies_by_connection_ms(requests),
        "other_requests_latency_ms": service_calls,
        "checks": len(scenario.log.checks), "lag_zero_after_s": lag_zero_after_s,
        "final_summary_matches_processors": all(
            final_service[name]["totalRequests"] == final_processors[name]["totalRequests"]
            for name in ("default", "fallback")),
        "stack": {name: {"cpu_s": cpu_s[name],
                         "peak_rss_mb": round(usage[name][1] / 2**20, 1),
                         **({"throttled_periods": cgroup_usage[name]["throttled_periods"]}
                            if name in cgroup_usage else {})}
                  for name in stack_processes},
        "stack_peak_rss_mb": round(sum(usage[name][1] for name in stack_processes) / 2**20, 1),
        "processors": {name: {"cpu_s": cpu_s[name]} for name in harness_processes},
        "limits": {limit.service: {"cpus": limit.cpus, "memory_mb": round(limit.memory_bytes / 2**20)}
                   for limit in limits},
        "generator": {"cpu_s": round(generator["cpu_user_s"] + generator["cpu_sys_s"], 2),
                      "max_rss_kb": generator["max_rss_kb"]},
        "stages": stage_shares,
        "checks_detail": scenario.log.checks,
    }
    windows_p99 = window_percentiles(requests, 0.99)
    result["paycore"]["windows_p99_ms"] = [[start, round(p99, 4)] for start, p99 in windows_p99]
    result["paycore"]["service_events"] = {"totals": events.totals(), "failed_scrapes": events.failed_scrapes}
    if floor:
        floor_p99 = success_latencies_ms(floor)[0]["p99"]
        result["paycore"]["floor"] = {
            "p99_ms": floor_p99,
            "p99_to_floor": round(latency["p99"] / floor_p99, 2),
            "worst_window_p99_to_floor": round(max(p99 for _, p99 in windows_p99) / floor_p99, 2)}
    out = RESULTS / f"bench-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    draw_chart(out.with_suffix(".png"), requests, bucket_s, shares,
               [stage["from_s"] for stage in stage_shares], floor=floor,
               events=events.series(load_started_ms),
               check_seconds=[(check["at_ms"] - load_started_ms) / 1000 for check in scenario.log.checks])
    print_table(result, out)
    clean = successful == len(requests) and inconsistencies == 0 and result["lag"]["lag"] == 0
    return (0 if clean else 1), result


def print_side_by_side(runs: list[tuple[int, dict]]) -> None:
    print("\nrun                      p50      p90      p99    p99.9  failed  incons.  lag  "
          "instances cpu s  instances rss MB  redis cpu s / rss MB  score")
    for _, result in runs:
        run = result["paycore"]
        latency = run["post_latency_ms"]
        instances = {name: usage for name, usage in run["stack"].items() if name.startswith("api")}
        redis = run["stack"].get("redis")
        redis_usage = f"{redis['cpu_s']:.1f} / {redis['peak_rss_mb']}" if redis else "-"
        print(f"{run['variant']:<22} {latency['p50']:7.3f}  {latency['p90']:7.3f}  {latency['p99']:7.3f}  "
              f"{latency['p99.9']:7.3f}  {run['failed']:6}  "
              f"{result['multa']['composicao']['total_inconsistencias']:7}  {result['lag']['lag']:3}  "
              f"{sum(u['cpu_s'] for u in instances.values()):15.1f}  "
              f"{sum(u['peak_rss_mb'] for u in instances.values()):16.1f}  "
              f"{redis_usage:>20}  "
              f"{result['total_liquido']:.0f}")
    by_variant = {result["paycore"]["variant"]: result["paycore"]["post_latency_ms"] for _, result in runs}
    disk, tmpfs = by_variant.get(Variant("embedded", "disk").name), by_variant.get(Variant("embedded", "tmpfs").name)
    if disk and tmpfs:
        print("disk + sync / tmpfs: " + "  ".join(
            f"{quantile} {disk[quantile] / tmpfs[quantile]:.2f}x" for quantile in ("p50", "p99", "p99.9")))


def print_table(result: dict, out: Path) -> None:
    run = result["paycore"]
    latency = run["post_latency_ms"]
    print(f"results: {out} (+ .png)")
    print(f"POST /payments  p50 {latency['p50']:.3f}  p90 {latency['p90']:.3f}  p99 {latency['p99']:.3f}  "
          f"p99.9 {latency['p99.9']:.3f}  max {latency['max']:.3f} ms   {run['rps']} req/s")
    read = run["post_read_latency_ms"]
    print(f"   as read by the generator  p50 {read['p50']:.3f}  p90 {read['p90']:.3f}  p99 {read['p99']:.3f}  "
          f"p99.9 {read['p99.9']:.3f}  max {read['max']:.3f} ms")
    for name, by_connection in run["post_latency_ms_by_connection"].items():
        print(f"   on a {name.replace('_', ' '):<18}  p50 {by_connection['p50']:.3f}  p90 {by_connection['p90']:.3f}  "
              f"p99 {by_connection['p99']:.3f}  max {by_connection['max']:.3f} ms")
    for name, other in run["other_requests_latency_ms"].items():
        print(f"{name:>14}  p50 {other['p50']:.3f}  p99 {other['p99']:.3f}  max {other['max']:.3f} ms")
    print(f"requests {run['requests']}  failed {run['failed']}  inconsistencies "
          f"{result['multa']['composicao']['total_inconsistencias']} in {run['checks']} checks  "
          f"lag at teardown {result['lag']['lag']}  lag 0 after {run['lag_zero_after_s']} s")
    print(f"score {result['total_liquido']:.2f}  (gross {result['total_bruto']:.2f}, fees "
          f"{result['total_taxas']:.2f}, bonus {result['p99']['bonus']}, fine {result['multa']['porcentagem']})")
    if "floor" in run:
        floor = run["floor"]
        print(f"floor p99 {floor['p99_ms']:.3f} ms: p99 {floor['p99_to_floor']:.2f}x the floor, the worst "
              f"{LATENCY_WINDOW_S:g} s window's {floor['worst_window_p99_to_floor']:.2f}x")
    totals = run["service_events"]["totals"]
    print("instances: " + ", ".join(f"{name} {count:.0f}" for name, count in totals.items()))
    for name, usage in run["stack"].items():
        print(f"{name:>14}  cpu {usage['cpu_s']:.2f} s  peak rss {usage['peak_rss_mb']} MB  "
              f"throttled {usage.get('throttled_periods', '-')}")
    processors = "  ".join(f"{name} {usage['cpu_s']:.2f} s" for name, usage in run["processors"].items())
    print(f"stack peak rss {run['stack_peak_rss_mb']} MB; outside the stack, cpu of generator "
          f"{run['generator']['cpu_s']} s  {processors}")
    for stage in run["stages"]:
        recorded = stage["recorded"]
        total = recorded["default"] + recorded["fallback"]
        share = recorded["default"] / total if total else 0
        print(f"  from {stage['from_s']:>6} s  default {stage['default']} fallback {stage['fallback']}: "
              f"default {recorded['default']} fallback {recorded['fallback']} ({share:.1%} default)")


if __name__ == "__main__":
    sys.exit(main())
