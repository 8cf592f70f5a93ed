"""make soak: SOAK_PAYMENTS fresh payments (default 10,000,000) through the
production topology under the compose file's limits, at the highest rate it
sustains, the processors emulated in C and answering at once
(perf/topology.py).

The rate is SOAK_RATE, or 90 % of the knee that a short capacity sweep finds
(perf/capacity.py, steps of SOAK_PROBE_SECONDS, default 10, from 2,000/s;
SOAK_PROBE_MAX_P99_MS and SOAK_PROBE_MAX_VUS as their CAPACITY_ namesakes).
Every SOAK_SAMPLE_S (default 5) it samples the RSS of each process of the
stack, the memory charged to each service's cgroup (what its limit holds:
RSS and the tmpfs pages it wrote first), the bytes held in the stack's shared
directory (tmpfs) and its data directory (disk; storage_directories), the
payments accepted, refused (by reason), dropped and failed, what the
processors recorded, and whether a process exited. When most payments offered over the last 30 s were not
accepted it stops the load and says why.

After the load it SIGKILLs instance 1, starts it again and times until its
unix socket answers GET /payments-summary; then it waits until the
processors hold every accepted payment and checks the service's summary
against the processors' own, exactly (count and cents, per processor).

Writes perf/results/soak-<time>.json and .png (memory and disk over payments
accepted; rates over time) and prints the table. Ctrl-C or SIGTERM stops the
load, writes what was sampled and stops everything it started.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import PRE_ALLOCATED_VUS, StepLimits, commit, knee, sweep  # noqa: E402
from cgroups import CgroupJail, compose_jail  # noqa: E402
from native import build_tools  # noqa: E402
from open_loop import OpenLoopLoad, refusals  # noqa: E402
from stop_signals import stop_on_first_signal  # noqa: E402
from topology import FastTopology  # noqa: E402
from unix_http import UnixHTTPConnection  # noqa: E402
from usage import directory_bytes, resident_bytes  # noqa: E402

from paycore.stack import Stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "perf" / "results"
PROBE_RATES = [2000.0, 4000.0, 8000.0]
SUSTAINED_SHARE = 0.9
EARLY_STOP_WINDOW_S = 30.0
EARLY_STOP_ACCEPTED_SHARE = 0.5
SERVE_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 600.0
# after this share of the payments, memory and disk grow (or not) per payment: the slope
SLOPE_FROM_SHARE = 0.1


def storage_directories(stack: Stack) -> dict[str, Path]:
    """Where the stack keeps its state, by what holds it: the shared directory (accepted
    ids, the ledger's tail, the health board) and the data directory (journals, payments record)."""
    return {"tmpfs": stack.shared_dir, "disk": stack.layout.data}


def probe_rate(tools: dict[str, Path], jail: CgroupJail | None, limits: StepLimits) -> float:
    steps: list[dict] = []
    sweep(tools, jail, PROBE_RATES, limits, steps)
    best = knee(steps)
    if best is None:
        raise SystemExit(f"the stack held none of the probe's rates ({PROBE_RATES[0]:g}/s and up): set SOAK_RATE")
    rate = round(best["rate"] * SUSTAINED_SHARE, -2)
    print(f"probe: knee {best['rate']:,.0f}/s; soaking at {rate:,.0f}/s", flush=True)
    return rate


def sample(topology: FastTopology, load: OpenLoopLoad, started: float, jail: CgroupJail | None) -> dict:
    progress = load.latest() or {}
    rss: dict[str, int | None] = {}
    exited: dict[str, int] = {}
    for name, process in topology.stack_processes().items():
        if process.poll() is not None:
            exited[name] = process.returncode
            rss[name] = None
            continue
        try:
            rss[name] = resident_bytes(process.pid)
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            rss[name] = None
    return {
        "t_s": round(time.monotonic() - started, 1),
        # the generator's counts are as of its last progress line, up to a second before t_s
        "load_t_s": progress.get("duration_s", 0.0),
        "offered": progress.get("started", 0) + progress.get("dropped", 0),
        "accepted": progress.get("ok_2xx", 0),
        "refused_total": progress.get("other_status", 0), "refused": refusals(progress.get("answers", [])),
        "dropped": progress.get("dropped", 0), "failed": progress.get("failed", 0),
        "p99_ms": progress["p99_us"] / 1000 if progress.get("p99_us") is not None else None,
        "recorded": topology.processed_count(),
        "rss_bytes": rss, "exited": exited,
        "cgroup_memory_bytes": jail.memory_usage() if jail else {},
        "storage_bytes": {name: directory_bytes(path) for name, path in storage_directories(topology.stack).items()},
    }


def early_stop_reason(samples: list[dict]) -> str | None:
    """Why to stop the load: most of what was offered over the last window was not accepted."""
    last = samples[-1]
    earlier = [s for s in samples if s["load_t_s"] <= last["load_t_s"] - EARLY_STOP_WINDOW_S]
    if not earlier:
        return None
    first = earlier[-1]
    offered = last["offered"] - first["offered"]
    accepted = last["accepted"] - first["accepted"]
    if offered == 0 or accepted >= EARLY_STOP_ACCEPTED_SHARE * offered:
        return None
    refused = {why: count - first["refused"].get(why, 0) for why, count in last["refused"].items()
               if count > first["refused"].get(why, 0)}
    return (f"{accepted:,} of {offered:,} payments offered over the last {EARLY_STOP_WINDOW_S:g} s were accepted "
            f"(refused: {refused or 'none'}; failed {last['failed'] - first['failed']:,}, dropped "
            f"{last['dropped'] - first['dropped']:,}; exited: {last['exited'] or 'none'})")


def summary_status(socket_path: str) -> int | None:
    connection = UnixHTTPConnection(socket_path)
    try:
        connection.request("GET", "/payments-summary")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def restart_instance(stack: Stack, index: int) -> dict:
    """SIGKILL, start again, and the seconds until it listens and until it answers (None:
    it did not; error says why)."""
    stack.stop_instance(index, signal.SIGKILL)
    started = time.monotonic()
    try:
        stack.start_instance(index)
    except (RuntimeError, TimeoutError) as error:
        return {"instance": index, "listening_after_s": None, "serving_after_s": None, "error": str(error)}
    listening = time.monotonic()
    while summary_status(stack.socket_path(index)) != 200:
        if time.monotonic() - started > SERVE_TIMEOUT_S:
            return {"instance": index, "listening_after_s": round(listening - started, 3), "serving_after_s": None}
        time.sleep(0.01)
    return {"instance": index, "listening_after_s": round(listening - started, 3),
            "serving_after_s": round(time.monotonic() - started, 3)}


def reconcile(topology: FastTopology, accepted: int) -> dict:
    """Waits until the processors hold every accepted payment and the service's summary
    equals theirs; what was found then, at the timeout, or once no instance is alive."""
    started = time.monotonic()
    while True:
        processed = topology.processed()
        recorded = sum(report["totalRequests"] for report in processed.values())
        try:
            service, service_error = topology.service_summary(), None
        except (OSError, RuntimeError) as error:
            service, service_error = None, f"{type(error).__name__}: {error}"
        matches = service is not None and all(
            service[name]["totalRequests"] == processed[name]["totalRequests"]
            and service[name]["totalAmount"] == processed[name]["totalAmount"] for name in processed)
        waited = time.monotonic() - started
        instances_alive = any(process.poll() is None for name, process in topology.stack_processes().items()
                              if name.startswith("api"))
        if (recorded >= accepted and matches) or waited > SETTLE_TIMEOUT_S or not instances_alive:
            break
        time.sleep(0.5)
    return {"settled_after_s": round(waited, 2), "accepted": accepted, "recorded": recorded,
            "not_recorded": max(0, accepted - recorded), "summary_matches_processors": matches,
            "instances_alive": instances_alive, "service": service, "service_error": service_error,
            "processors": {name: {"totalRequests": report["totalRequests"], "totalAmount": report["totalAmount"]}
                           for name, report in processed.items()}}


def slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares bytes per payment."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def growth(samples: list[dict]) -> dict[str, float | None]:
    """Bytes per payment accepted, of the stack's RSS, each process's and each storage directory's."""
    if not samples:
        return {}
    final = samples[-1]["accepted"]
    kept = [s for s in samples if s["accepted"] >= SLOPE_FROM_SHARE * final]
    series = {f"rss {name}": [(s["accepted"], s["rss_bytes"][name]) for s in kept if s["rss_bytes"][name] is not None]
              for name in samples[0]["rss_bytes"]}
    series["rss stack"] = [(s["accepted"], sum(s["rss_bytes"].values())) for s in kept
                           if None not in s["rss_bytes"].values()]
    for name in samples[0]["storage_bytes"]:
        series[name] = [(s["accepted"], s["storage_bytes"][name]) for s in kept]
    return {name: None if (value := slope(points)) is None else round(value, 2) for name, points in series.items()}


def print_sample(s: dict, previous: dict | None) -> None:
    if previous is None:
        print(f"{'t s':>7} {'accepted':>11} {'accepted/s':>10} {'refused':>9} {'failed':>7} {'recorded':>11} "
              f"{'p99 ms':>7} {'RSS MB (lb/api1/api2)':>22} {'tmpfs MB':>9} {'disk MB':>8}")
    seconds = s["load_t_s"] - (previous["load_t_s"] if previous else 0)
    rate = (s["accepted"] - (previous["accepted"] if previous else 0)) / seconds if seconds else 0
    rss = "/".join("-" if value is None else f"{value / 2**20:.0f}" for value in s["rss_bytes"].values())
    p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:.2f}"
    print(f"{s['t_s']:>7.0f} {s['accepted']:>11,} {rate:>10,.0f} {s['refused_total']:>9,} {s['failed']:>7,} "
          f"{s['recorded']:>11,} {p99:>7} {rss:>22} {s['storage_bytes']['tmpfs'] / 2**20:>9.1f} "
          f"{s['storage_bytes']['disk'] / 2**20:>8.1f}" + (f"  exited {s['exited']}" if s["exited"] else ""),
          flush=True)


def soak(tools: dict[str, Path], jail: CgroupJail | None, payments: int, rate: float, sample_s: float,
         max_vus: int, result: dict) -> None:
    """Fills result as it goes, so an interrupted soak still reports what it saw."""
    samples = result["samples"]
    with FastTopology(tools["processor"], jail, payments) as topology:
        load = OpenLoopLoad(tools["loadgen"], topology.stack.port, rate, payments / rate, max_vus,
                            PRE_ALLOCATED_VUS)
        started = time.monotonic()
        try:
            while load.running():
                try:
                    load.process.wait(timeout=sample_s)
                except subprocess.TimeoutExpired:
                    pass
                samples.append(sample(topology, load, started, jail))
                print_sample(samples[-1], samples[-2] if len(samples) > 1 else None)
                reason = early_stop_reason(samples)
                if reason and "stopped_early" not in result:
                    result["stopped_early"] = reason
                    print(f"stopping the load early: {reason}", flush=True)
                    load.stop()
        finally:
            load.stop()
            generator = load.wait()
            result["generator"] = generator
        samples.append(sample(topology, load, started, jail))
        result["restart"] = restart_instance(topology.stack, 1)
        print(f"instance 1 SIGKILLed and started again: listening after {result['restart']['listening_after_s']} s, "
              f"answering after {result['restart']['serving_after_s']} s {result['restart'].get('error', '')}",
              flush=True)
        result["reconciliation"] = reconcile(topology, generator["warmup_ok_2xx"] + generator["ok_2xx"])
        result["after_restart"] = sample(topology, load, started, jail)
        if jail:
            result["cgroups"] = jail.usage()


def draw_chart(path: Path, samples: list[dict], memory_limits_mb: dict[str, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, rates) = plt.subplots(2, 1, figsize=(10, 8))
    accepted_m = [s["accepted"] / 1e6 for s in samples]
    for name in samples[0]["rss_bytes"]:
        memory.plot(accepted_m, [None if s["rss_bytes"][name] is None else s["rss_bytes"][name] / 2**20
                                 for s in samples], label=f"RSS {name}")
    for name in samples[0]["storage_bytes"]:
        memory.plot(accepted_m, [s["storage_bytes"][name] / 2**20 for s in samples], linestyle="--",
                    label=f"{name} (shared dir)" if name == "tmpfs" else f"{name} (data dir)")
    for name in samples[0]["cgroup_memory_bytes"]:
        if name.startswith("api"):
            memory.plot(accepted_m, [s["cgroup_memory_bytes"][name] / 2**20 for s in samples], linestyle=":",
                        label=f"cgroup {name} (limit {memory_limits_mb[name]:.0f} MB)")
    memory.set_xlabel("payments accepted (millions)")
    memory.set_ylabel("MB")
    memory.set_title("memory and storage over payments accepted")
    memory.legend(loc="upper left")
    intervals = [(p, s) for p, s in zip(samples, samples[1:]) if s["load_t_s"] > p["load_t_s"]]
    for key, label in (("accepted", "accepted/s"), ("refused_total", "refused/s"), ("failed", "failed/s")):
        rates.plot([s["load_t_s"] for _, s in intervals],
                   [(s[key] - p[key]) / (s["load_t_s"] - p["load_t_s"]) for p, s in intervals], label=label)
    rates.set_xlabel("seconds since the load began")
    rates.set_ylabel("per second")
    rates.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_table(result: dict, out: Path) -> None:
    print(f"\nresults: {out} (+ .png)")
    generator = result.get("generator")
    if generator:
        print(f"offered {generator['started'] + generator['dropped']:,} at {result['rate']:,.0f}/s over "
              f"{generator['duration_s']:,.0f} s: accepted {generator['ok_2xx']:,}, refused "
              f"{generator['other_status']:,} {refusals(generator['answers']) or ''}, dropped "
              f"{generator['dropped']:,}, failed {generator['failed']:,}")
        print(f"POST /payments p50 {generator['p50_us'] / 1000 if generator['p50_us'] is not None else '-'} "
              f"p99 {generator['p99_us'] / 1000 if generator['p99_us'] is not None else '-'} "
              f"p99.9 {generator['p999_us'] / 1000 if generator['p999_us'] is not None else '-'} ms")
    if result.get("stopped_early"):
        print(f"stopped early: {result['stopped_early']}")
    samples = result["samples"]
    if samples:
        first, last = samples[0], samples[-1]
        for name in last["rss_bytes"]:
            values = [s["rss_bytes"][name] for s in samples if s["rss_bytes"][name] is not None]
            if values:
                print(f"RSS {name:>14}: {values[0] / 2**20:7.1f} MB at start, {max(values) / 2**20:7.1f} MB peak, "
                      f"{values[-1] / 2**20:7.1f} MB at the end")
        for name in last["storage_bytes"]:
            print(f"{name:>18}: {first['storage_bytes'][name] / 2**20:7.1f} MB at start, "
                  f"{last['storage_bytes'][name] / 2**20:7.1f} MB at the end")
        print("bytes per payment accepted (slope after the first "
              f"{SLOPE_FROM_SHARE:.0%}): " + ", ".join(f"{name} {value}" for name, value in result["growth"].items()))
    if result.get("restart"):
        print(f"restart of instance 1 after SIGKILL: listening after {result['restart']['listening_after_s']} s, "
              f"answering GET /payments-summary after {result['restart']['serving_after_s']} s"
              + (f"; failed: {result['restart']['error']}" if "error" in result["restart"] else ""))
    exited = result.get("after_restart", {}).get("exited")
    if exited:
        print(f"not running at the end (exit status; -9: killed, by the OOM killer under a memory limit): {exited}")
    for name, usage in result.get("cgroups", {}).items():
        print(f"cgroup {name:>14}: memory peak {usage['memory_peak_bytes'] / 2**20:.1f} MB (tmpfs pages it "
              f"touched first included), {usage['throttled_periods']} periods throttled")
    reconciliation = result.get("reconciliation")
    if reconciliation:
        def totals(summary: dict | None) -> str:
            if summary is None:
                return f"unavailable ({reconciliation['service_error']})"
            return ", ".join(f"{name} {report['totalRequests']:,} / {report['totalAmount']}"
                             for name, report in summary.items())
        print(f"after {reconciliation['settled_after_s']} s: processors recorded {reconciliation['recorded']:,} "
              f"of {reconciliation['accepted']:,} accepted; service summary "
              f"{'equals' if reconciliation['summary_matches_processors'] else 'DIFFERS FROM'} the processors' "
              f"(service: {totals(reconciliation['service'])}; processors: {totals(reconciliation['processors'])})")


def main() -> int:
    stop_on_first_signal()
    payments = int(float(os.environ.get("SOAK_PAYMENTS", 10_000_000)))
    sample_s = float(os.environ.get("SOAK_SAMPLE_S", 5))
    probe_limits = StepLimits.from_environment("SOAK_PROBE", 10)
    tools = build_tools()
    jail = compose_jail(REPO / "docker-compose.yml", "paycore-soak")
    result: dict = {"commit": commit(), "cpus": os.cpu_count(), "payments": payments, "cgroups": jail is not None,
                    "samples": [], "interrupted": False}
    try:
        result["rate"] = float(os.environ["SOAK_RATE"]) if os.environ.get("SOAK_RATE") else \
            probe_rate(tools, jail, probe_limits)
        soak(tools, jail, payments, result["rate"], sample_s, probe_limits.max_vus, result)
    except KeyboardInterrupt:
        result["interrupted"] = True
        print("interrupted: writing what was sampled", file=sys.stderr)
    finally:
        if jail:
            jail.close()
    result["growth"] = growth(result["samples"])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    if result["samples"]:
        draw_chart(out.with_suffix(".png"), result["samples"],
                   {limit.service: limit.memory_bytes / 2**20 for limit in jail.limits} if jail else {})
    print_table(result, out)
    if result["interrupted"]:
        return 130
    reconciliation = result.get("reconciliation", {})
    clean = (reconciliation.get("summary_matches_processors") and reconciliation.get("not_recorded") == 0
             and result["restart"]["serving_after_s"] is not None)
    return 0 if clean and "stopped_early" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
