"""The production topology for capacity and soak runs: the load balancer and
the instances as docker-compose.yml runs them, held by cgroups to its limits,
and the C processor emulators (perf/processor.c) answering at once, outside
the budget, with room to spare (perf/bench_processor.py measures them)."""
from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path

from cgroups import CgroupJail
from fast_processor import FastProcessor
from scenario import HttpJson, Processors

from paycore.stack import Stack, StackSettings

FEES = {"default": "0.07", "fallback": "0.10"}


class FastTopology:
    """A fresh stack and fresh processors, started on entering and stopped on leaving."""

    def __init__(self, processor: Path, jail: CgroupJail | None, expected_payments: int,
                 instance_env: dict[str, str] | None = None) -> None:
        self._processor = processor
        self._jail = jail
        self._expected_payments = expected_payments
        self._instance_env = instance_env or {}
        self.processors: dict[str, FastProcessor] = {}
        self.stack: Stack | None = None

    def __enter__(self) -> FastTopology:
        try:
            for name, fee in FEES.items():
                self.processors[name] = FastProcessor(self._processor, "--fee", fee,
                                                      "--expected-payments", str(self._expected_payments))
            default, fallback = self.processors["default"], self.processors["fallback"]
            self.stack = Stack(StackSettings(
                port=0, default_url=default.url, fallback_url=fallback.url, quiet=True,
                cgroups=self._jail.directories if self._jail else {},
                # The data directory on disk, synced per batch, as docker-compose.yml has it.
                instance_env={"PAYCORE_LOG_LEVEL": "WARNING", "PAYCORE_JOURNAL_SYNC": "1",
                              **self._instance_env})).start()
        except BaseException:
            self.__exit__()
            raise
        self.admin = Processors(default.url, fallback.url, parse_float=Decimal)
        self.service = HttpJson(self.stack.url, parse_float=Decimal)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.stack is not None:
            self.stack.stop()
        for processor in self.processors.values():
            processor.stop()

    def stack_processes(self) -> dict[str, subprocess.Popen]:
        """By docker-compose service name; an instance restarted is a new process."""
        return {"load-balancer": self.stack.balancer,
                **{f"api{index}": process for index, process in sorted(self.stack.instances.items())}}

    def processor_pids(self) -> dict[str, int]:
        return {f"{name}-processor": processor.pid for name, processor in self.processors.items()}

    def processed(self) -> dict[str, dict]:
        """The processors' own admin summaries, amounts as exact Decimals."""
        return self.admin.summary()

    def processed_count(self) -> int:
        return sum(report["totalRequests"] for report in self.processed().values())

    def service_summary(self) -> dict[str, dict]:
        """The service's unbounded summary, amounts as exact Decimals."""
        status, summary, _ = self.service.call("GET", "/payments-summary")
        if status != 200:
            raise RuntimeError(f"GET /payments-summary answered {status}")
        return summary
