"""A budget of grants per turn of the event loop: work that comes in bursts
(a backlog's sends when a processor comes back, a journal batch releasing
hundreds of them at once) is spread over turns, so the answers that wait in
between never wait behind all of it."""
from __future__ import annotations

import asyncio
from collections import deque


class TurnBudget:
    def __init__(self, per_turn: int) -> None:
        self._per_turn = per_turn
        self._waiting: deque[asyncio.Future] = deque()
        self._granting: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self) -> asyncio.Future:
        """A future resolved in a later turn: those resolved in one turn, at
        most per_turn, first come first served, all go on in the next."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._waiting.append(future)
        if self._granting is None:
            self._granting = self._loop.call_soon(self._grant)
        return future

    def _grant(self) -> None:
        self._granting = None
        granted = 0
        while self._waiting and granted < self._per_turn:
            future = self._waiting.popleft()
            if not future.done():  # a task cancelled while it waited
                future.set_result(None)
                granted += 1
        if self._waiting:
            self._granting = self._loop.call_soon(self._grant)
