"""How a server process tells the process that started it where it listens.

The parent hands the child the write end of a pipe (PAYCORE_READY_FD); once
the child accepts connections it writes one line, its listening addresses
separated by commas, and closes the pipe. A child asked for port 0 so takes
its port from the OS itself, with nobody else able to take it in between,
and the parent learns it without polling. End of file before the line means
the child exited first.
"""
from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterable

READY_FD = "PAYCORE_READY_FD"


def announce(addresses: Iterable[str]) -> None:
    """In the child, once it listens; nothing when no parent asked."""
    descriptor = os.environ.pop(READY_FD, None)
    if descriptor is None:
        return
    fd = int(descriptor)
    try:
        os.write(fd, (",".join(addresses) + "\n").encode())
    finally:
        os.close(fd)


def start_listening(command: list[str], timeout_s: float, env: dict[str, str] | None = None,
                    **popen_options) -> tuple[subprocess.Popen, list[str]]:
    """Start a server process; once it listens, return it and its addresses.
    If it does not within timeout_s, it is killed."""
    ready = ReadyPipe()
    process = subprocess.Popen(command, env={**(os.environ if env is None else env), **ready.env},
                               pass_fds=ready.pass_fds, **popen_options)
    try:
        return process, ready.wait(process, timeout_s)
    except BaseException:
        process.kill()
        process.wait()
        raise


class ReadyPipe:
    """The parent's end: `env` and `pass_fds` go to the child's Popen, then
    `wait(process)` returns the addresses the child announced."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()

    @property
    def env(self) -> dict[str, str]:
        return {READY_FD: str(self._write_fd)}

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self._write_fd,)

    def wait(self, process: subprocess.Popen, timeout_s: float) -> list[str]:
        # Only the child holds the write end from now on: its exit ends the pipe.
        os.close(self._write_fd)
        deadline = time.monotonic() + timeout_s
        received = b""
        try:
            while not received.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                readable, _, _ = select.select([self._read_fd], [], [], max(0.0, remaining))
                if not readable:
                    raise TimeoutError(f"{_name(process)} did not listen within {timeout_s:g} s")
                chunk = os.read(self._read_fd, 4096)
                if not chunk:
                    raise RuntimeError(f"{_name(process)} exited with {_exit_code(process)} before listening")
                received += chunk
        finally:
            os.close(self._read_fd)
        return received.decode().strip().split(",")


def _name(process: subprocess.Popen) -> str:
    return " ".join(map(str, process.args))


def _exit_code(process: subprocess.Popen) -> int | None:
    try:
        return process.wait(5)
    except subprocess.TimeoutExpired:
        return None
