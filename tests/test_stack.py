"""The local topology's own housekeeping."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import free_port

START_A_STACK_AND_WAIT = """
import sys, time
from paycore.stack import Stack, StackSettings
ports = [int(port) for port in sys.argv[1:]]
stack = Stack(StackSettings(port=ports[0], default_port=ports[1], fallback_port=ports[2], quiet=True)).start()
pids = [stack.balancer.pid, *(p.pid for p in stack.processors), *(p.pid for p in stack.instances.values())]
print(" ".join(map(str, pids)), flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_owner_takes_its_stack_with_it():
    owner = subprocess.Popen([sys.executable, "-c", START_A_STACK_AND_WAIT,
                              *(str(free_port()) for _ in range(3))],
                             stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in owner.stdout.readline().split()]
    assert len(pids) == 5 and all(alive(pid) for pid in pids)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == []
