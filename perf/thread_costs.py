"""make bench-threads: where the stack's CPU goes, thread by thread.

The production topology (load balancer, two instances) with the C processor
emulator answering at once (perf/topology.py): first 10 s idle, then fresh
payments at THREADS_RATE per second (600, the final round's peak) from the
open-loop generator for THREADS_SECONDS (30), after a 5 s warm-up. The data
directory on tmpfs, or with THREADS_DATA=disk on disk with a sync per batch.
No cgroup limits: the question is where the CPU goes, not how a budget holds.

Per thread of each process, read from /proc before and after: CPU ms and
context switches per payment (per second while idle) and CPU migrations. The
instances name their threads (service/os_threads.py): "python" is an
instance's event loop, or the balancer. Then the latency the generator saw,
on reused and on new connections.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

from bench import Variant  # noqa: E402
from native import build_tools  # noqa: E402
from open_loop import OpenLoopLoad  # noqa: E402
from report import latencies_by_connection_ms, read_requests  # noqa: E402
from topology import FastTopology  # noqa: E402
from usage import cpu_seconds  # noqa: E402

IDLE_S = 10.0
WARMUP_S = 5.0
MAX_VUS = 600
PRE_ALLOCATED_VUS = 300


@dataclass(frozen=True)
class ThreadUsage:
    name: str
    cpu_s: float
    switches: int
    migrations: int


def thread_usage(pid: int) -> dict[int, ThreadUsage]:
    """Every live thread of the process, by thread id."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            stat = (task / "stat").read_text()
            sched = {key.strip(): value for key, value in
                     (line.split(":", 1) for line in (task / "sched").read_text().splitlines() if ":" in line)}
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        threads[int(tid)] = ThreadUsage(
            name=stat[stat.index("(") + 1:stat.rindex(")")],
            cpu_s=cpu_seconds(stat),
            switches=int(float(sched["nr_switches"])),
            migrations=int(float(sched["se.nr_migrations"])))
    return threads


def snapshot(pids: dict[str, int]) -> dict[str, dict[int, ThreadUsage]]:
    return {service: thread_usage(pid) for service, pid in pids.items()}


def print_costs(before: dict[str, dict[int, ThreadUsage]], after: dict[str, dict[int, ThreadUsage]],
                per: float, unit: str) -> None:
    print(f"{'service':>14} {'thread':>15}  {'CPU ms/' + unit:>16}  {'switches/' + unit:>18}  migrations")
    stack_cpu = 0.0
    for service, threads in after.items():
        service_cpu = 0.0
        for tid, now in sorted(threads.items()):
            then = before[service].get(tid, ThreadUsage(now.name, 0.0, 0, 0))
            cpu = now.cpu_s - then.cpu_s
            service_cpu += cpu
            print(f"{service:>14} {now.name:>15}  {cpu * 1000 / per:16.3f}  "
                  f"{(now.switches - then.switches) / per:18.3f}  {now.migrations - then.migrations:10d}")
        print(f"{service:>14} {'all':>15}  {service_cpu * 1000 / per:16.3f}")
        stack_cpu += service_cpu
    print(f"{'the stack':>30}  {stack_cpu * 1000 / per:16.3f}")


def main() -> int:
    rate = float(os.environ.get("THREADS_RATE", "600"))
    seconds = float(os.environ.get("THREADS_SECONDS", "30"))
    variant = Variant("embedded", os.environ.get("THREADS_DATA", "tmpfs"))
    tools = build_tools()
    expected = int(rate * (WARMUP_S + seconds) * 1.2) + 10_000
    requests_csv = REPO / "perf" / "results" / f"threads-{time.strftime('%Y%m%dT%H%M%S')}-requests.csv"
    requests_csv.parent.mkdir(parents=True, exist_ok=True)
    with variant.instance_env() as data_env, FastTopology(tools["processor"], None, expected, data_env) as topology:
        pids = {service: process.pid for service, process in topology.stack_processes().items()}
        idle_from = snapshot(pids)
        time.sleep(IDLE_S)
        print(f"idle stack ({variant.name}), per second:")
        print_costs(idle_from, snapshot(pids), IDLE_S, "s")
        OpenLoopLoad(tools["loadgen"], topology.stack.port, rate, WARMUP_S, MAX_VUS, PRE_ALLOCATED_VUS).wait()
        load_from = snapshot(pids)
        generator = OpenLoopLoad(tools["loadgen"], topology.stack.port, rate, seconds, MAX_VUS,
                                 PRE_ALLOCATED_VUS, requests_csv).wait()
        load_to = snapshot(pids)
    accepted = generator["ok_2xx"]
    print(f"\n{rate:g} payments/s for {seconds:g} s: {accepted} accepted, {generator['other_status']} refused, "
          f"{generator['failed']} failed; per payment the stack accepted (each instance serves about half):")
    if accepted:
        print_costs(load_from, load_to, accepted, "payment")
    latency = latencies_by_connection_ms(read_requests(requests_csv))
    for kind in ("reused_connection", "new_connection"):
        figures = latency[kind]
        print(f"latency on a {kind.replace('_', ' ')}: " + "  ".join(
            f"{name} {figures[name]:.3f}" for name in ("p50", "p90", "p99", "p99.9") if name in figures) + " ms")
    requests_csv.unlink()
    return 0 if accepted and not generator["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
