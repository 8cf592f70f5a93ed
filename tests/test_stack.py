"""The local topology's own housekeeping."""
from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import alive, call

from paycore.stack import Stack, StackSettings

START_A_STACK_AND_WAIT = """
import sys
from paycore.stack import Stack, StackSettings
stack = Stack(StackSettings(port=0, default_port=0, fallback_port=0, quiet=True)).start()
pids = [stack.balancer.pid, *(p.pid for p in stack.processors), *(p.pid for p in stack.instances.values())]
print(" ".join(map(str, pids)), stack.run_dir, stack.shared_dir, flush=True)
sys.stdin.read()
"""


def test_a_killed_owner_takes_its_stack_with_it():
    owner = subprocess.Popen([sys.executable, "-c", START_A_STACK_AND_WAIT],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    *pids, run_dir, shared_dir = owner.stdout.readline().split()
    pids = [int(pid) for pid in pids]
    try:
        assert len(pids) == 5 and all(alive(pid) for pid in pids)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        # The owner was given no time to remove its scratch directories.
        for directory in (run_dir, shared_dir):
            shutil.rmtree(directory, ignore_errors=True)


def test_ports_left_to_the_os_are_learnt_from_the_processes_that_bound_them():
    with Stack(StackSettings(port=0, default_port=0, fallback_port=0, quiet=True)) as stack:
        ports = [stack.port, *(int(url.rsplit(":", 1)[1]) for url in (stack.default_url, stack.fallback_url))]
        assert len(set(ports)) == 3 and 0 not in ports
        assert stack.url == f"http://127.0.0.1:{stack.port}"
        assert call(http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5),
                    "GET", "/payments-summary")[0] == 200


def test_a_stack_refuses_to_give_two_listeners_one_port():
    with pytest.raises(ValueError, match="must differ"):
        Stack(StackSettings(port=9999, default_port=9999, fallback_port=0))


def test_a_process_that_exits_at_start_fails_the_stack_at_once():
    stack = Stack(StackSettings(port=0, default_port=0, fallback_port=0,
                                quiet=True, instance_env={"PAYCORE_QUEUE_CAPACITY": "many"}))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with"):
        stack.start()
    assert time.monotonic() - started < 10
    assert stack.instances == {} and stack.processors == [] and stack.balancer is None
