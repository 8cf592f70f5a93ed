"""What the instances of one deployment share, behind one interface.

- the accepted correlationIds: a duplicate is refused whichever instance sees it;
- the pending payments: accepted and not yet held by a processor;
- the ledger: what each processor holds, by requestedAt millisecond;
- the health board: one poller at a time for every instance.

Two stores implement it and pass the same contract tests
(tests/test_store_contract.py):

- EmbeddedStore (service/store/embedded/store.py), the default: shared memory on one
  host's tmpfs plus one journal per instance; no server.
- RedisStore (service/store/redis_store.py), PAYCORE_STORE=redis://HOST:PORT/DB:
  any number of instances on any number of hosts.

What the embedded store answers at once comes back as a plain value; the Redis
store answers the same calls with a future. Callers take both (`Deferred`), so
the embedded request path never pays for a future or a task.
"""
from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from paycore.core.ring_queue import RingQueue

if TYPE_CHECKING:
    from .embedded.journal import JournalWriter

T = TypeVar("T")
U = TypeVar("U")
Deferred = T | asyncio.Future  # the value, or a future of it
# (default count, default cents, fallback count, fallback cents)
Totals = tuple[int, int, int, int]
# (uuid16, cents): accepted, never sent.
Unsent = tuple[bytes, int]
# (uuid16, cents, processor, requested_at_ms): sent there, outcome unknown.
Unresolved = tuple[bytes, int, int, int]


async def resolve(value: Deferred[T]) -> T:
    """The value of a deferred, for callers that may wait."""
    return await value if isinstance(value, asyncio.Future) else value


def then(value: Deferred[T], transform: Callable[[T], U],
         on_error: Callable[[BaseException], U]) -> Deferred[U]:
    """transform(value), or a future of it once value's future is done; a
    failed (or cancelled) future gives on_error(its error) instead."""
    if not isinstance(value, asyncio.Future):
        return transform(value)
    result = value.get_loop().create_future()

    def finish(done: asyncio.Future) -> None:
        if result.done():
            return
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        result.set_result(transform(done.result()) if error is None else on_error(error))

    value.add_done_callback(finish)
    return result


class Acceptance(enum.IntEnum):
    ACCEPTED = 0     # the id is claimed and the payment pending, durably
    DUPLICATE = 1    # accepted before, same amount: nothing changes
    CONFLICT = 2     # accepted before with another amount
    IDS_FULL = 3     # no room to remember one more id
    QUEUE_FULL = 4   # no room to keep one more pending payment


class PendingWork(Protocol):
    """The dispatcher, as a store sees it: where pending payments go."""

    def notify(self) -> None:
        """Payments were pushed onto the queue."""

    def resume(self, unsent: list[Unsent], unresolved: list[Unresolved]) -> None:
        """Take over payments some instance (this one before a restart, or a
        dead one) left: queue the unsent, settle the unresolved by asking the
        processors first."""


class HealthBoard(Protocol):
    """Processor health as the one current poller last saw it.

    Times are this process's monotonic milliseconds (time.monotonic() * 1000);
    a board shared across hosts converts them."""

    def claim_poll(self, interval_ms: int) -> Deferred[float | None]:
        """The turn to call the processors' health endpoints, at most one
        instance per interval_ms across the deployment: the time of the
        turn, or None when it is not this instance's."""

    def publish(self, reports: dict[str, dict[str, Any]]) -> Deferred[None]:
        """{processor name: {"failing", "minResponseTime", "observedAt"}}, merged
        into the board (a processor missing keeps its last report)."""

    def latest(self) -> Deferred[dict[str, dict[str, Any]] | None]:
        """The board's reports, or None when unchanged since the last call."""

    def close(self) -> None: ...


class Store(Protocol):
    health: HealthBoard
    journal: JournalWriter | None  # once started, when the store keeps one per instance

    async def start(self, queue: RingQueue, work: PendingWork) -> None:
        """Before serving: hand `work` what this instance left pending before a
        restart, and from then on feed pending payments onto `queue`."""

    def accept(self, uuid16: bytes, cents: int) -> Deferred[Acceptance]:
        """Claim the id and, when it is new, make the payment pending. The
        answer that promises it must wait for `after_durable`."""

    def after_durable(self, callback: Callable[..., Any], *args: Any) -> None:
        """callback(*args) once every acceptance and send so far is durable:
        at once when nothing waits. Callbacks run in the order given."""

    def flush_waiting(self) -> None:
        """End of a batch (a read, a dispatcher pass): write what waits now."""

    def sending(self, uuid16: bytes, processor: int, requested_at_ms: int) -> Deferred[bool]:
        """Record where a payment is about to be sent, before it is. False:
        the payment is no longer this instance's to send (another instance
        took it over); drop it."""

    def settle(self, uuid16: bytes, processor: int, requested_at_ms: int, cents: int) -> None:
        """The processor holds the payment: into the ledger, pending no more.
        A store shared across hosts, where an instance taken for dead may still
        finish a send, counts a second settle of the same payment as nothing.
        Nothing waits on it: if it is lost, the payment is still pending and
        whoever resumes it asks the processors first."""

    def summary(self, from_ms: int | None, to_ms: int | None) -> Deferred[Totals]:
        """Totals by requestedAt, both bounds inclusive; None: unbounded."""

    def purge(self) -> Deferred[None]:
        """The ledger and the accepted ids start over (between test runs);
        payments still pending are still delivered."""

    async def close(self) -> None: ...
