"""The embedded store's health board: health.json in the shared directory,
and an exclusive flock on health.lock for the one instance that polls.

If the poller dies, the kernel drops its lock and another instance takes
over, continuing the schedule written on the board (polledAt), so the limit
of one health call per interval holds across the hand-over. The board is
replaced atomically; times are the host's monotonic clock, which every
instance on the host shares."""
from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import Any

import orjson

log = logging.getLogger("paycore.health")


def _now_ms() -> float:
    return time.monotonic() * 1000


class FileHealthBoard:
    """health.json: {"polledAt": ms, "processors": {name: {failing, minResponseTime, observedAt}}}."""

    def __init__(self, shared_dir: str) -> None:
        self.path = os.path.join(shared_dir, "health.json")
        self._lock_path = os.path.join(shared_dir, "health.lock")
        self._lock_fd: int | None = None
        # The poller's last turn: read from the board when the lock is taken,
        # kept here after that, since only the lock holder writes it.
        self._polled_at_ms = 0.0
        self._seen_mtime_ns = -1

    @property
    def is_poller(self) -> bool:
        return self._lock_fd is not None

    def claim_poll(self, interval_ms: int) -> float | None:
        if self._lock_fd is None:
            if not self._try_lock():
                return None
            self._polled_at_ms = self._read()["polledAt"]
        now_ms = _now_ms()
        # A board from before a reboot carries a clock reading from the future.
        last_polled_ms = self._polled_at_ms if self._polled_at_ms <= now_ms else 0
        if now_ms < last_polled_ms + interval_ms:
            return None
        board = self._read()
        board["polledAt"] = self._polled_at_ms = now_ms
        self._write(board)
        return now_ms

    def publish(self, reports: dict[str, dict[str, Any]]) -> None:
        board = self._read()
        board["processors"].update(reports)
        self._write(board)

    def latest(self) -> dict[str, dict[str, Any]] | None:
        try:
            mtime_ns = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime_ns == self._seen_mtime_ns:
            return None
        self._seen_mtime_ns = mtime_ns
        return self._read()["processors"]

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _try_lock(self) -> bool:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        log.info("this instance now polls processor health")
        return True

    def _read(self) -> dict:
        try:
            with open(self.path, "rb") as file:
                return orjson.loads(file.read())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {"polledAt": 0, "processors": {}}

    def _write(self, board: dict) -> None:
        temporary = f"{self.path}.{os.getpid()}"
        with open(temporary, "wb") as file:
            file.write(orjson.dumps(board))
        os.replace(temporary, self.path)
