"""make bench-loop: how long an instance's event loop goes without turning while
a backlog drains, beside an idle event loop measured in the same run.

One instance runs in this process, on the production settings but for the
processors' health interval; the emulated processors and the C load generator
run in processes of their own. The load generator posts at a fixed rate; both
processors fail until BACKLOG payments are queued, then come back, and the
instance drains the backlog while payments keep coming. A task that yields at
every turn of the loop measures each turn in the loop thread's CPU time (time
the host gives other processes is not counted), and counts what the instance
did in it: payments taken off the queue, requests sent to processors.

The same measure in an idle event loop (a process of its own, doing nothing
else) is the floor: on a VM its turns too sometimes take a millisecond or more
(interrupts, the host), and a turn of the instance's says nothing of the
instance unless it stands out from that.

LOOP_RUNS (default 3) rounds; the median of each figure is printed, and the
exit status is 1 if a turn of the instance took longer than 1 ms and longer
than every turn of the idle loop in the same round. `loop_turns.py --idle
SECONDS` is the idle loop (it prints its TurnTimes as JSON).
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

from native import build_tools  # noqa: E402
from scenario import Processors  # noqa: E402

from paycore.service.app import Instance  # noqa: E402
from paycore.service.config import Settings  # noqa: E402
from paycore.stack import Stack, StackSettings  # noqa: E402

STALL_LIMIT_S = 0.001
LONGEST_KEPT = 5


@dataclass
class Round:
    rate: int = 600           # payments per second: the final round's peak
    seconds: float = 6.0
    backlog: int = 1500       # queued while both processors fail
    warm_up: int = 100        # accepted before the measuring starts


@dataclass
class TurnTimes:
    """The loop thread's CPU time per turn: how many, how many over the limit,
    the longest few."""
    turns: int = 0
    over_limit: int = 0
    longest_s: list[float] = field(default_factory=list)

    def add(self, cpu_s: float) -> None:
        self.turns += 1
        if cpu_s > STALL_LIMIT_S:
            self.over_limit += 1
        if len(self.longest_s) < LONGEST_KEPT or cpu_s > self.longest_s[0]:
            self.longest_s = sorted(self.longest_s + [cpu_s])[-LONGEST_KEPT:]


@dataclass
class TurnReport:
    times: TurnTimes = field(default_factory=TurnTimes)
    most_taken: int = 0       # payments taken off the queue in one turn
    most_sent: int = 0        # requests to processors started in one turn
    taken: int = 0
    sent: int = 0
    gc_collections: list[int] = field(default_factory=list)
    gc_longest_s: list[float] = field(default_factory=list)
    posted: dict = field(default_factory=dict)
    idle_loop: TurnTimes = field(default_factory=TurnTimes)

    @property
    def stalls(self) -> list[float]:
        """Turns over the limit and over the idle loop's longest."""
        floor = max(self.idle_loop.longest_s or [0.0])
        return [turn for turn in self.times.longest_s if turn > STALL_LIMIT_S and turn > floor]


class TurnClock:
    """A task that yields at every turn of the loop and times each turn in
    the loop thread's CPU time, until `stopping`."""

    def __init__(self, times: TurnTimes) -> None:
        self.times = times
        self.stopping = False

    async def measure(self) -> None:
        previous = time.thread_time()
        while not self.stopping:
            self.turn_begins()
            await asyncio.sleep(0)
            self.times.add(time.thread_time() - previous)
            self.turn_ended()
            previous = time.thread_time()

    def turn_begins(self) -> None:
        pass

    def turn_ended(self) -> None:
        pass


class TurnProbe(TurnClock):
    """The clock, and what the instance did in each turn."""

    def __init__(self, instance: Instance, report: TurnReport) -> None:
        super().__init__(report.times)
        self.report = report
        self._taken = self._sent = 0
        store, clients = instance.store, instance.clients
        sending = store.sending

        def counted_sending(attempt):
            self._taken += 1
            return sending(attempt)

        store.sending = counted_sending
        for client in clients:
            client.send_payment = self._counted(client.send_payment)

    def _counted(self, send):
        async def counted_send(*args):
            self._sent += 1
            return await send(*args)
        return counted_send

    def turn_begins(self) -> None:
        self._taken = self._sent = 0

    def turn_ended(self) -> None:
        report = self.report
        report.taken += self._taken
        report.sent += self._sent
        report.most_taken = max(report.most_taken, self._taken)
        report.most_sent = max(report.most_sent, self._sent)


async def _idle_loop(seconds: float) -> TurnTimes:
    """The same clock in a loop with nothing else to do."""
    clock = TurnClock(TurnTimes())
    asyncio.get_running_loop().call_later(seconds, setattr, clock, "stopping", True)
    await clock.measure()
    return clock.times


async def _eventually(condition, timeout_s: float, what: str) -> None:
    ends = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > ends:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


def drain_a_backlog(loadgen: Path, work_dir: Path, shape: Round) -> TurnReport:
    """One round (see the module's doc); the instance's data in work_dir."""
    stack_settings = StackSettings(port=0, default_port=0, fallback_port=0, quiet=True, instances=1,
                                   emulator_args=("--health-interval", "0.5"))
    report = TurnReport()
    with Stack(stack_settings) as stack:
        processors = Processors(stack.default_url, stack.fallback_url)
        for name in ("default", "fallback"):
            processors.configure(name, 0, True)
        settings = Settings(
            instance="measured", listen=("127.0.0.1:0",), metrics_listen="",
            shared_dir=str(work_dir / "shared"), data_dir=str(work_dir / "data"),
            default_url=stack.default_url, fallback_url=stack.fallback_url,
            health_interval_ms=550, retry_max_ms=300, drain_timeout_ms=0)
        uvloop.run(_drain(settings, processors, loadgen, work_dir, shape, report))
    return report


async def _drain(settings: Settings, processors: Processors, loadgen: Path, work_dir: Path, shape: Round,
                 report: TurnReport) -> None:
    loop = asyncio.get_running_loop()
    instance = Instance(settings)
    await instance.start()  # which freezes what it built, as in production
    probe = TurnProbe(instance, report)
    executor = ThreadPoolExecutor(1)  # its thread started before the measuring is
    await loop.run_in_executor(executor, processors.summary)
    port = instance.addresses[0].rpartition(":")[2]
    posting = subprocess.Popen(
        [str(loadgen), "--target", f"127.0.0.1:{port}", "--rate", str(shape.rate), "--duration",
         str(shape.seconds), "--max-vus", "64", "--out", str(work_dir / "requests.csv")],
        stdout=subprocess.PIPE, text=True)
    idle_loop = None
    measuring = None
    try:
        await _eventually(lambda: len(instance.queue) >= shape.warm_up, shape.seconds, "no payment accepted")
        idle_loop = subprocess.Popen([sys.executable, __file__, "--idle", str(shape.seconds)],
                                     stdout=subprocess.PIPE, text=True)
        measuring = loop.create_task(probe.measure())
        await _eventually(lambda: len(instance.queue) >= shape.backlog, shape.seconds, "no backlog built up")
        # The processors come back to the backlog while payments keep coming.
        for name in ("default", "fallback"):
            await loop.run_in_executor(executor, processors.configure, name, 0, False)
        stdout, _ = await loop.run_in_executor(executor, posting.communicate)
        report.posted = json.loads(stdout.strip().splitlines()[-1])

        def processed() -> int:
            return sum(summary["totalRequests"] for summary in processors.summary().values())

        ends = time.monotonic() + 30
        while await loop.run_in_executor(executor, processed) < report.posted["ok_2xx"]:
            if time.monotonic() > ends:
                raise TimeoutError("the backlog was not processed")
            await asyncio.sleep(0.1)
    finally:
        probe.stopping = True
        if measuring is not None:
            await measuring
        if idle_loop is not None:
            report.idle_loop = TurnTimes(**json.loads((await loop.run_in_executor(executor, idle_loop.communicate))[0]))
        posting.kill()
        posting.wait()
        executor.shutdown()
        report.gc_collections = list(instance.gc_pauses.collections)
        report.gc_longest_s = list(instance.gc_pauses.longest_s)
        await instance.stop()


def _ms(seconds: list[float]) -> list[float]:
    return [round(value * 1000, 3) for value in seconds]


def main() -> int:
    runs = int(os.environ.get("LOOP_RUNS", 3))
    loadgen = build_tools()["loadgen"]
    reports = []
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="paycore-loop-", dir=REPO / "perf") as work_dir:
            report = drain_a_backlog(loadgen, Path(work_dir), Round())
        reports.append(report)
        print(f"round {run + 1}: {report.times.turns} turns, {report.times.over_limit} over 1 ms; longest (ms) "
              f"{_ms(report.times.longest_s)}, idle loop's {_ms(report.idle_loop.longest_s)}; "
              f"most taken / sent in a turn {report.most_taken} / {report.most_sent}; "
              f"gc {report.gc_collections}, longest (ms) {_ms(report.gc_longest_s)}; "
              f"posted {report.posted.get('ok_2xx')} of {report.posted.get('requests')}")
    longest = statistics.median(max(report.times.longest_s) for report in reports)
    idle = statistics.median(max(report.idle_loop.longest_s or [0.0]) for report in reports)
    print(f"median of {runs}: the instance's longest turn {longest * 1000:.3f} ms, the idle loop's "
          f"{idle * 1000:.3f} ms, ratio {longest / idle if idle else float('inf'):.2f}x")
    results = REPO / "perf" / "results"
    results.mkdir(exist_ok=True)
    (results / f"loop-turns-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(
        json.dumps([asdict(report) for report in reports], indent=2))
    stalls = [report.stalls for report in reports if report.stalls]
    if stalls:
        print(f"stalls over 1 ms beyond the idle loop's: {[_ms(found) for found in stalls]}")
    return 1 if stalls else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--idle"]:
        print(json.dumps(asdict(uvloop.run(_idle_loop(float(sys.argv[2]))))))
    else:
        sys.exit(main())
