"""`make run` keeps its state in its run directory and resumes it: killed any
way and started again, every payment that got a 2xx is paid exactly once and
the summary equals the processors' (tests/test_crash_safety.py does the same
for one instance at a time). A clean stop leaves nothing on /dev/shm;
`--clean` starts from nothing."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RunningStack, alive, call
from test_crash_safety import Load, assert_exactly_once
from test_service import as_summary, payment

from paycore.layout import StateLayout
from paycore.stack import INSTANCES

READY = re.compile(r"serving on (\S+); processors (\S+) \(default\), (\S+) \(fallback\)")
ACCEPTED_BEFORE_THE_KILL = 1500
ACCEPTED_AFTER_THE_RESTART = 300
LOAD_WAIT_S = 20.0


class StackProcess:
    """`python -m paycore.stack` started as `make run` starts it: a process
    group of its own, a run directory, the current directory elsewhere. It
    has what RunningStack reads of a Stack."""

    def __init__(self, run_dir: Path, *options: str, python: str = sys.executable,
                 base_env: dict[str, str] | None = None, **environment: str) -> None:
        """python: the interpreter to run it with; base_env: the environment
        to start from (this process's by default)."""
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [python, "-m", "paycore.stack", *options], cwd=run_dir.parent, text=True,
            stdout=subprocess.PIPE, start_new_session=True,
            env={**(os.environ if base_env is None else base_env), "PAYCORE_RUN_DIR": str(run_dir),
                 "PAYCORE_PORT": "0", "PAYCORE_DEFAULT_PORT": "0", "PAYCORE_FALLBACK_PORT": "0",
                 "PAYCORE_LOG_LEVEL": "WARNING", **environment})
        # Each process it starts has a bounded time to listen: the line comes, or the end.
        ready = READY.search(self.process.stdout.readline())
        if ready is None:
            self.kill_everything()
            raise RuntimeError(f"paycore stack did not start (exit code {self.process.poll()})")
        url, self.default_url, self.fallback_url = ready.groups()
        self.port = int(url.rsplit(":", 1)[1])
        self.instances = dict.fromkeys(range(1, INSTANCES + 1))

    def socket_path(self, index: int) -> str:
        return str(self.run_dir / "sockets" / f"api-{index}.sock")

    def processes(self) -> list[int]:
        """The stack's process and every process it started (in sessions of their own)."""
        parents: dict[int, list[int]] = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(parent, []).append(int(entry))
        found, unseen = [self.process.pid], [self.process.pid]
        while unseen:
            children = parents.get(unseen.pop(), [])
            found += children
            unseen += children
        return found

    def kill_everything(self) -> list[int]:
        """SIGKILL to the stack's process group and to every process it started."""
        pids = self.processes()
        os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def wait_until_gone(pids: list[int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == []


def wait_for_accepted(load: Load, count: int) -> None:
    deadline = time.monotonic() + LOAD_WAIT_S
    while len(load.accepted) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(load.accepted) >= count, (len(load.accepted), len(load.unanswered), load.refused)


@pytest.fixture
def start(tmp_path):
    """Starts StackProcesses on one run directory; what is left running at the
    end is killed, and what is left on tmpfs removed."""
    run_dir = tmp_path / "run"
    started: list[StackProcess] = []

    def start_stack(*options: str, **keywords) -> StackProcess:
        started.append(StackProcess(run_dir, *options, **keywords))
        return started[-1]

    yield start_stack
    for stack in started:
        if stack.process.poll() is None:
            stack.kill_everything()
            stack.process.wait()
    StateLayout.kept_in(run_dir).release()


@pytest.mark.parametrize("kill", ["every process", "the process group"])
def test_a_killed_stack_started_again_pays_every_accepted_payment_exactly_once(start, kill):
    # The instances that SIGTERM reaches when the stack dies drain briefly.
    first = start(PAYCORE_DRAIN_TIMEOUT_MS="1000")
    live = RunningStack(first)
    live.default.set_delay(40)  # so that the kill finds payments in flight
    with Load(live) as before:
        wait_for_accepted(before, ACCEPTED_BEFORE_THE_KILL)
        settled = live.processors_summary()["default"]["totalRequests"]
        if kill == "every process":
            pids = first.kill_everything()
        else:  # as a terminal's kill -9 -PGID: its children get SIGTERM from the kernel
            pids = first.processes()
            os.killpg(first.process.pid, signal.SIGKILL)
    wait_until_gone(pids)
    assert settled > ACCEPTED_BEFORE_THE_KILL / 2

    second = start()
    live = RunningStack(second)
    with Load(live) as after:
        wait_for_accepted(after, ACCEPTED_AFTER_THE_RESTART)
    assert_exactly_once(live, before.accepted + after.accepted, before.unanswered + after.unanswered)
    # Through the load balancer too, the payments settled before the kill included.
    assert call(live.client(), "GET", "/payments-summary")[1] == as_summary(live.processors_summary())
    assert second.stop() == 0


def test_a_clean_stop_leaves_nothing_on_tmpfs_and_the_next_start_resumes(start):
    stack = start()
    shared = StateLayout.kept_in(stack.run_dir).shared
    live = RunningStack(stack)
    for amount in ("1.00", "2.50", "0.01"):
        assert call(live.client(), "POST", "/payments", payment(amount=amount))[0] == 202
    live.wait_until_processed(3)
    assert shared.is_dir()
    assert stack.stop() == 0
    assert not shared.exists()

    stack = start()
    live = RunningStack(stack)
    summary = call(live.client(), "GET", "/payments-summary")[1]
    assert summary["default"] == {"totalRequests": 3, "totalAmount": 3.51}
    assert live.processors_summary()["default"]["totalAmount"] == 3.51
    assert stack.stop() == 0

    stack = start("--clean")
    live = RunningStack(stack)
    empty = {"totalRequests": 0, "totalAmount": 0}
    assert call(live.client(), "GET", "/payments-summary")[1] == {"default": empty, "fallback": empty}
    assert live.processors_summary()["default"]["totalRequests"] == 0
    assert stack.stop() == 0
