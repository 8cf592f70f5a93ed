"""Hold the stack to the CPU and memory limits docker-compose.yml declares, with
cgroups v1: one cpu and one memory cgroup per compose service."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
PERIOD_US = 100_000
# docker reads "150MB" with binary multiples (RAMInBytes).
UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


def memory_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"not a memory size: {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Limits:
    service: str
    cpus: float
    memory_bytes: int


def compose_limits(compose_file: Path) -> list[Limits]:
    services = yaml.safe_load(compose_file.read_text())["services"]
    limits = []
    for name, service in services.items():
        declared = service["deploy"]["resources"]["limits"]
        limits.append(Limits(name, float(declared["cpus"]), memory_bytes(declared["memory"])))
    return limits


class CgroupJail:
    """cgroups named paycore-bench/<service>, made fresh; removed again by close()."""

    def __init__(self, limits: list[Limits], prefix: str = "paycore-bench") -> None:
        self.limits = limits
        self._prefix = prefix
        self.directories: dict[str, tuple[str, ...]] = {}
        for limit in limits:
            cpu = CPU_ROOT / prefix / limit.service
            memory = MEMORY_ROOT / prefix / limit.service
            for directory in (cpu, memory):
                _make_fresh(directory)
            (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(int(limit.cpus * PERIOD_US)))
            (memory / "memory.limit_in_bytes").write_text(str(limit.memory_bytes))
            self.directories[limit.service] = (str(cpu), str(memory))

    @staticmethod
    def available() -> bool:
        return os.access(CPU_ROOT, os.W_OK) and os.access(MEMORY_ROOT, os.W_OK)

    def usage(self) -> dict[str, dict[str, int]]:
        """Per service: CFS periods in which it was throttled, and its memory peak
        (bytes, page cache and tmpfs pages it touched included)."""
        report = {}
        for limit in self.limits:
            cpu_dir, memory_dir = (Path(d) for d in self.directories[limit.service])
            stat = dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())
            report[limit.service] = {
                "throttled_periods": int(stat.get("nr_throttled", 0)),
                "memory_peak_bytes": int((memory_dir / "memory.max_usage_in_bytes").read_text()),
            }
        return report

    def memory_usage(self) -> dict[str, int]:
        """Per service: the memory charged to it now (bytes, tmpfs pages it touched first included)."""
        return {limit.service: int((Path(self.directories[limit.service][1]) / "memory.usage_in_bytes").read_text())
                for limit in self.limits}

    def reset_memory_peaks(self) -> None:
        """Start the memory peaks that usage() reports over from now."""
        for limit in self.limits:
            (Path(self.directories[limit.service][1]) / "memory.max_usage_in_bytes").write_text("0")

    def close(self) -> None:
        for limit in self.limits:
            for directory in self.directories[limit.service]:
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
        for root in (CPU_ROOT, MEMORY_ROOT):
            try:
                os.rmdir(root / self._prefix)
            except OSError:
                pass


def _make_fresh(directory: Path) -> None:
    """A cgroup of its own for this run. One left by a run that died still
    holds the charges of what that run left on tmpfs, which would count
    against this run's memory limit (its first instance killed before it
    listens): removed first, it keeps them, and the new one starts at zero.
    One that still holds processes belongs to a run still going."""
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise RuntimeError(f"{directory} is in use ({error.strerror}): is another run with the same"
                           " cgroup prefix still going?") from None
    directory.mkdir(parents=True)


def compose_jail(compose_file: Path, prefix: str) -> CgroupJail | None:
    """The compose file's limits as cgroups named <prefix>/<service>, or None
    (and a warning) where this process may not create cgroups."""
    if not CgroupJail.available():
        print("warning: cgroups not writable; the stack runs without its limits", file=sys.stderr)
        return None
    return CgroupJail(compose_limits(compose_file), prefix)
