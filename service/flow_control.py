"""Back-pressure for one client connection, as uvicorn's flow_control.py does it:
reading from the connection pauses while its client does not take its answers
(the transport's buffer of unsent answers above the high-water mark, until it
drains below the low-water mark), while too many of its requests wait for
theirs, and while input already read waits for its turn to be parsed; it
resumes when none holds.

So what one client can make an instance hold is bounded, however much it
pipelines: unsent answers up to the high-water mark plus one slice's worth,
owed answers up to MAX_OWED_ANSWERS plus one slice's requests, and one read
of input not parsed yet. What it sends beyond that waits in the kernel's
socket buffers, and then in its own.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

# The kernel's share of a connection's unsent answers (SO_SNDBUF, which Linux
# doubles). Left to autotuning it grows to megabytes, and a client that reads
# nothing gets tens of thousands of answers worked out before the high-water
# mark below is reached; an answer here is a few hundred bytes.
SEND_BUFFER_BYTES = 64 * 1024

HIGH_WATER_BYTES = 64 * 1024
LOW_WATER_BYTES = 16 * 1024
# Requests read whose answers are not written yet (the store has not answered,
# or an earlier answer has not): past this, reading pauses.
MAX_OWED_ANSWERS = 64
# A connection's share of a loop turn: input beyond it waits for the next turn,
# so a client that sends a pile of requests at once is served like the others.
FEED_BYTES = 4096

# Why reading is paused (bits of FlowControl.paused).
WRITE_BACKLOG = 1
ANSWERS_OWED = 2
INPUT_HELD = 4


class FlowControl:
    __slots__ = ("_stalled_sweeps", "_take_turn", "_transport", "paused")

    def __init__(self, transport: asyncio.Transport, take_turn: Callable[[], None]) -> None:
        """take_turn: called when input held is all that keeps reading paused,
        so the next slice of it may be parsed."""
        self._transport = transport
        self._take_turn = take_turn
        self._stalled_sweeps = 0
        self.paused = 0
        transport.set_write_buffer_limits(high=HIGH_WATER_BYTES, low=LOW_WATER_BYTES)
        connection = transport.get_extra_info("socket")
        if connection is not None:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    def pause_writing(self) -> None:
        """The transport's buffer passed the high-water mark."""
        self._pause(WRITE_BACKLOG)

    def resume_writing(self) -> None:
        """The transport's buffer drained below the low-water mark."""
        self._resume(WRITE_BACKLOG)

    def answers_owed(self, count: int) -> None:
        if count >= MAX_OWED_ANSWERS:
            self._pause(ANSWERS_OWED)
        else:
            self._resume(ANSWERS_OWED)

    def hold_input(self) -> None:
        """Input was read that waits for the next turn of the loop to be parsed."""
        self._pause(INPUT_HELD)
        if self.paused == INPUT_HELD:
            self._take_turn()

    def input_taken(self) -> None:
        """All input held has been parsed."""
        self._resume(INPUT_HELD)

    def stalled(self, timeout_sweeps: int) -> bool:
        """Called at each sweep of the connection guard: True, and the connection
        dropped, once answers have waited unsent for more than timeout_sweeps
        sweeps. A client that takes none of its answers would otherwise hold
        its connection for ever: closing it waits until the answers are sent."""
        if not self._transport.get_write_buffer_size():
            self._stalled_sweeps = 0
            return False
        self._stalled_sweeps += 1
        if self._stalled_sweeps <= timeout_sweeps:
            return False
        self._transport.abort()
        return True

    def _pause(self, reason: int) -> None:
        if not self.paused:
            self._transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused:
                self._transport.resume_reading()
            elif self.paused == INPUT_HELD:
                self._take_turn()
