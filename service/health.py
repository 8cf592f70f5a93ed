"""Processor health, polled by exactly one instance at a time and shared with all.

The processors allow one health call per 5 s, shared by every caller, so the
instances must not poll on their own: the store's health board hands out the
turns to poll (at most one per interval across the deployment) and carries
the verdicts to every instance, which reads it a few times a second and feeds
it to its router.
"""
from __future__ import annotations

import asyncio
import logging

from .processor_client import ProcessorClient, ProcessorError, ProcessorHealth
from .router import PROCESSOR_NAMES, Router
from .store.base import HealthBoard, resolve

log = logging.getLogger("paycore.health")

BOARD_READ_INTERVAL_S = 0.2
POLL_TURN_CHECK_S = 0.1


class HealthMonitor:
    """Feeds the board to the router; polls the processors when it is this instance's turn."""

    def __init__(self, board: HealthBoard, clients: tuple[ProcessorClient, ProcessorClient],
                 router: Router, interval_ms: int) -> None:
        self.board = board
        self._clients = clients
        self._router = router
        self._interval_ms = interval_ms
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._follow_board()),
                       asyncio.ensure_future(self._poll_on_turns())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow_board(self) -> None:
        while True:
            try:
                reports = await resolve(self.board.latest())
            except ConnectionError as error:
                log.warning("health board unreadable: %s", error)
                reports = None
            if reports is not None:
                for name, state in zip(PROCESSOR_NAMES, self._router.processors):
                    report = reports.get(name)
                    if report is not None:
                        state.apply_health(
                            ProcessorHealth(report["failing"], report["minResponseTime"]),
                            report["observedAt"])
            await asyncio.sleep(BOARD_READ_INTERVAL_S)

    async def _poll_on_turns(self) -> None:
        while True:
            try:
                turn_ms = await resolve(self.board.claim_poll(self._interval_ms))
                if turn_ms is not None:
                    await self._poll_all(turn_ms)
            except ConnectionError as error:
                log.warning("health board unavailable: %s", error)
            await asyncio.sleep(POLL_TURN_CHECK_S)

    async def _poll_all(self, turn_ms: float) -> None:
        results = await asyncio.gather(*(self._poll(client) for client in self._clients))
        # Dated from when the check was sent: what a payment saw while a slow
        # check was out is newer and must not be overruled by it. A check that
        # got no verdict (429, timeout) leaves the last one standing.
        reports = {name: {"failing": health.failing, "minResponseTime": health.min_response_time_ms,
                          "observedAt": turn_ms}
                   for name, health in zip(PROCESSOR_NAMES, results) if health is not None}
        if reports:
            await resolve(self.board.publish(reports))

    async def _poll(self, client: ProcessorClient) -> ProcessorHealth | None:
        try:
            return await client.health()
        except ProcessorError as error:
            log.debug("health check failed: %s", error)
            return None
