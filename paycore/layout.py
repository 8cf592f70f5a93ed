"""Where the local stack's processes keep their state, all in one place.

A run directory (`make run`: PAYCORE_RUN_DIR, default run/) keeps what must
outlive the stack, so that a stack started again with it resumes:

    sockets/            the instances' hand-off and API sockets
    logs/               each service's output, when the stack runs quiet (tests, benchmarks)
    state/data/         the instances' journals and payments record (PAYCORE_DATA_DIR)
    state/processors/   what each emulated processor recorded
    state/redis/        the Redis store's append-only file

The instances' shared state (accepted ids, the ledger's uncommitted tail,
health board, metrics sockets) lives on tmpfs, in /dev/shm/paycore-run-<digest of the run
directory's path>: the same directory for every start with that run
directory, so a killed stack leaves it to the next start; a clean stop
removes it, and the next start rebuilds it from the journals.

Without a run directory (tests, benchmarks) all of it is scratch: fresh
temporary directories, the processors' payments in memory, everything
removed at stop.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TMPFS = Path("/dev/shm")


@dataclass(frozen=True)
class StateLayout:
    run_dir: Path
    shared: Path
    kept: bool

    @classmethod
    def kept_in(cls, run_dir: Path) -> StateLayout:
        run_dir = run_dir.resolve()
        digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
        shared = TMPFS / f"paycore-run-{digest}" if TMPFS.is_dir() else run_dir / "shared"
        return cls(run_dir, shared, kept=True)

    @classmethod
    def scratch(cls) -> StateLayout:
        tmpfs = str(TMPFS) if TMPFS.is_dir() else None
        return cls(Path(tempfile.mkdtemp(prefix="paycore-")),
                   Path(tempfile.mkdtemp(prefix="paycore-shared-", dir=tmpfs)), kept=False)

    @property
    def sockets(self) -> Path:
        return self.run_dir / "sockets"

    @property
    def state(self) -> Path:
        return self.run_dir / "state"

    @property
    def logs(self) -> Path:
        """Each service's output, when the stack runs quiet."""
        return self.run_dir / "logs"

    @property
    def data(self) -> Path:
        return self.state / "data"

    @property
    def processors(self) -> Path:
        return self.state / "processors"

    @property
    def redis(self) -> Path:
        return self.state / "redis"

    def emulator_args(self, name: str) -> tuple[str, ...]:
        """The emulated processor `name` keeps its payments in a file, or in memory."""
        return ("--payments-file", str(self.processors / f"{name}.log")) if self.kept else ()

    def create(self) -> None:
        for directory in (self.sockets, self.shared, self.data, *((self.processors,) if self.kept else ())):
            directory.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Forget every payment kept: the next start begins from nothing."""
        for directory in (self.state, self.shared):
            shutil.rmtree(directory, ignore_errors=True)

    def release(self) -> None:
        """After the stack stopped: nothing left on tmpfs; a scratch run directory goes too."""
        shutil.rmtree(self.shared, ignore_errors=True)
        if not self.kept:
            shutil.rmtree(self.run_dir, ignore_errors=True)
