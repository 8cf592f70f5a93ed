"""How many payments the processor takes on at once: a fixed number in flight, a bounded line
behind them, everyone else turned away at once."""
import asyncio
from collections import deque


class AdmissionGate:
    def __init__(self, max_inflight: int, max_queued: int) -> None:
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._inflight = 0
        self._queued: deque[asyncio.Future[None]] = deque()

    def try_admit(self) -> asyncio.Future[None] | None:
        """A future that completes once the caller holds an in-flight slot (at once if one is
        free), or None when the line is full too. The holder must `release()` the slot."""
        slot = asyncio.get_running_loop().create_future()
        if self._inflight < self._max_inflight:
            self._inflight += 1
            slot.set_result(None)
        elif len(self._queued) < self._max_queued:
            self._queued.append(slot)
        else:
            return None
        return slot

    def release(self) -> None:
        while self._queued:
            successor = self._queued.popleft()
            if not successor.cancelled():
                successor.set_result(None)
                return
        self._inflight -= 1
