"""The health check's rate limit: one answered call per fixed window, shared by all callers,
with a short line of callers waiting for the next windows."""
import asyncio
from collections import deque


class HealthRateLimiter:
    """Windows are `interval` seconds long and counted from the first call ever made.
    A call in a window whose permit is taken waits in line; the line is served oldest
    first, one caller per window; when the line is full, callers are refused."""

    def __init__(self, interval: float, max_waiting: int) -> None:
        self._interval = interval
        self._max_waiting = max_waiting
        self._origin: float | None = None
        self._last_served_window = -1
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._next_window_timer: asyncio.TimerHandle | None = None

    def try_acquire(self) -> asyncio.Future[None] | None:
        """A future that completes when the caller may be answered, or None if refused.
        Cancelling the future (the caller gave up) takes it out of the line."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._origin is None:
            self._origin = now
        window = int((now - self._origin) // self._interval)
        self._drop_callers_who_left()
        permit = loop.create_future()
        if not self._waiting and window > self._last_served_window:
            self._last_served_window = window
            permit.set_result(None)
            return permit
        if len(self._waiting) >= self._max_waiting:
            return None
        self._waiting.append(permit)
        if self._next_window_timer is None:
            self._schedule_next_window(loop)
        return permit

    def _drop_callers_who_left(self) -> None:
        self._waiting = deque(permit for permit in self._waiting if not permit.cancelled())

    def _schedule_next_window(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._origin is not None
        window = self._last_served_window + 1
        self._next_window_timer = loop.call_at(
            self._origin + window * self._interval, self._open_window, loop, window
        )

    def _open_window(self, loop: asyncio.AbstractEventLoop, window: int) -> None:
        self._next_window_timer = None
        self._drop_callers_who_left()
        if not self._waiting:
            return
        # A caller may already have taken this window's permit while nobody was waiting.
        if window > self._last_served_window:
            self._last_served_window = window
            self._waiting.popleft().set_result(None)
        if self._waiting:
            self._schedule_next_window(loop)
