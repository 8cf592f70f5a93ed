"""The benchmark host's idle behaviour.

On this 2-vCPU virtual machine an idle vCPU halts, and every hand-over between
processes (generator -> instance -> processor and back) may have to wake one: a
cost that lands in the latency tail. Holding /dev/cpu_dma_latency at 0 (what
tuned's latency-performance profile does on servers) keeps idle CPUs polling
instead of halting, for as long as the file stays open. It changes the host,
not the service: the stack's cgroups are not charged for idle polling.
"""
from __future__ import annotations

import os
import struct

PM_QOS_DEVICE = "/dev/cpu_dma_latency"


class LowLatencyHost:
    def __init__(self) -> None:
        self._fd: int | None = None

    def __enter__(self) -> LowLatencyHost:
        self._fd = os.open(PM_QOS_DEVICE, os.O_WRONLY)
        os.write(self._fd, struct.pack("i", 0))
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the kernel drops the request with the file
            self._fd = None
