"""Processor health, polled by exactly one instance at a time and shared with all.

The processors allow one health call per 5 s, shared by every caller, so the
instances must not poll on their own. Whoever holds an exclusive flock on
health.lock in the shared directory is the poller; if it dies, the kernel
drops the lock and another instance takes over, continuing the poll schedule
written on the board, so the limit holds across the hand-over. The board is a
small JSON file replaced atomically; every instance reads it a few times a
second and feeds it to its router.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time

import orjson

from .processor_client import ProcessorClient, ProcessorError, ProcessorHealth
from .router import PROCESSOR_NAMES, Router

log = logging.getLogger("paycore.health")

BOARD_READ_INTERVAL_S = 0.2
LOCK_RETRY_INTERVAL_S = 1.0


class HealthBoard:
    """health.json: {"polledAt": ms, "processors": {name: {failing, minResponseTime, observedAt}}},
    times on the host's monotonic clock, which every instance shares."""

    def __init__(self, shared_dir: str) -> None:
        self.path = os.path.join(shared_dir, "health.json")
        self._seen_mtime_ns = -1

    def write(self, board: dict) -> None:
        temporary = f"{self.path}.{os.getpid()}"
        with open(temporary, "wb") as file:
            file.write(orjson.dumps(board))
        os.replace(temporary, self.path)

    def read(self) -> dict:
        try:
            with open(self.path, "rb") as file:
                board = orjson.loads(file.read())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {"polledAt": 0, "processors": {}}
        return board

    def read_if_changed(self) -> dict | None:
        try:
            mtime_ns = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime_ns == self._seen_mtime_ns:
            return None
        self._seen_mtime_ns = mtime_ns
        return self.read()


class HealthMonitor:
    """Feeds the board to the router; polls the processors while holding the lock."""

    def __init__(self, shared_dir: str, clients: tuple[ProcessorClient, ProcessorClient],
                 router: Router, interval_ms: int) -> None:
        self.board = HealthBoard(shared_dir)
        self._lock_path = os.path.join(shared_dir, "health.lock")
        self._clients = clients
        self._router = router
        self._interval_ms = interval_ms
        self._lock_fd: int | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def is_poller(self) -> bool:
        return self._lock_fd is not None

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._follow_board()),
                       asyncio.ensure_future(self._poll_when_elected())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _follow_board(self) -> None:
        while True:
            board = self.board.read_if_changed()
            if board is not None:
                for name, state in zip(PROCESSOR_NAMES, self._router.processors):
                    report = board["processors"].get(name)
                    if report is not None:
                        state.apply_health(
                            ProcessorHealth(report["failing"], report["minResponseTime"]),
                            report["observedAt"])
            await asyncio.sleep(BOARD_READ_INTERVAL_S)

    def _try_lock(self) -> bool:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _poll_when_elected(self) -> None:
        while not self._try_lock():
            await asyncio.sleep(LOCK_RETRY_INTERVAL_S)
        log.info("this instance now polls processor health")
        while True:
            board = self.board.read()
            now_ms = time.monotonic() * 1000
            # A board from before a reboot carries a clock reading from the future.
            last_polled_ms = board["polledAt"] if board["polledAt"] <= now_ms else 0
            wait_ms = last_polled_ms + self._interval_ms - now_ms
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
            board["polledAt"] = time.monotonic() * 1000
            results = await asyncio.gather(*(self._poll(client) for client in self._clients))
            # Dated from when the check was sent: what a payment saw while a slow
            # check was out is newer and must not be overruled by it.
            observed_at = board["polledAt"]
            for name, health in zip(PROCESSOR_NAMES, results):
                # A check that got no verdict (429, timeout) leaves the last one standing.
                if health is not None:
                    board["processors"][name] = {"failing": health.failing,
                                                 "minResponseTime": health.min_response_time_ms,
                                                 "observedAt": observed_at}
            self.board.write(board)

    async def _poll(self, client: ProcessorClient) -> ProcessorHealth | None:
        try:
            return await client.health()
        except ProcessorError as error:
            log.debug("health check failed: %s", error)
            return None
