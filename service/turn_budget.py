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
        self._granted = 0           # work that goes on in this turn
        self._granted_waiters = 0   # waiters granted, which go on in the next turn
        self._waiting: deque[asyncio.Future] = deque()
        self._turn_ends: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._granted_now: asyncio.Future | None = None

    def take(self) -> asyncio.Future:
        """A future to await before the work: done already while this turn's
        budget lasts (awaiting it does not yield, so a lone send costs no turn
        of the loop), else resolved in a later turn, first come first served."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._granted_now = self._loop.create_future()
            self._granted_now.set_result(None)
        if self._turn_ends is None:
            self._turn_ends = self._loop.call_soon(self._next_turn)
        if not self._waiting and self._granted < self._per_turn:
            self._granted += 1
            return self._granted_now
        future = self._loop.create_future()
        self._waiting.append(future)
        return future

    def _next_turn(self) -> None:
        """A new turn. The waiters granted in the last one go on in this one
        (woken before this callback runs) and count against it, as does any
        take later in it; those waiting now are granted the next turn's
        budget, since a future set now wakes its task in the next turn."""
        self._turn_ends = None
        self._granted = self._granted_waiters
        self._granted_waiters = 0
        while self._waiting and self._granted_waiters < self._per_turn:
            future = self._waiting.popleft()
            if not future.done():  # a task cancelled while it waited
                future.set_result(None)
                self._granted_waiters += 1
        if self._waiting or self._granted_waiters or self._granted:
            self._turn_ends = self._loop.call_soon(self._next_turn)
