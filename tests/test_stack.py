"""The local topology's own housekeeping."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from paycore.stack import Stack, StackSettings, free_ports

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
                              *(str(port) for port in free_ports(3))],
                             stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in owner.stdout.readline().split()]
    assert len(pids) == 5 and all(alive(pid) for pid in pids)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == []


def test_free_ports_are_distinct_and_open_and_avoid_what_they_are_told():
    # Probed one after another, a few hundred loopback ports repeat several times.
    ports = free_ports(500)
    assert len(set(ports)) == 500
    assert not set(free_ports(50, avoid=ports[:250])) & set(ports[:250])
    for port in ports[:20]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))


def test_a_stack_refuses_to_give_two_listeners_one_port():
    port, other = free_ports(2)
    with pytest.raises(ValueError, match="must differ"):
        Stack(StackSettings(port=port, default_port=port, fallback_port=other))


def test_a_process_that_exits_at_start_fails_the_stack_at_once():
    port, default_port, fallback_port = free_ports(3)
    stack = Stack(StackSettings(port=port, default_port=default_port, fallback_port=fallback_port,
                                quiet=True, instance_env={"PAYCORE_QUEUE_CAPACITY": "many"}))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with"):
        stack.start()
    assert time.monotonic() - started < 10
    assert stack.instances == {} and stack.processors == [] and stack.balancer is None
