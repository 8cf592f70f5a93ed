"""What the instances of one deployment share, behind one interface.

- the accepted correlationIds: a duplicate is refused whichever instance sees it;
- the pending payments: accepted and not yet held by a processor;
- the ledger: what each processor holds, by requestedAt millisecond;
- the health board: one poller at a time for every instance.

Two stores implement it and pass the same contract tests
(tests/test_store_contract.py):

- EmbeddedStore (service/store/embedded/store.py), the default: one host, no
  server: a journal per instance, a payments record on disk, shared memory
  for the accepted ids and the ledger's uncommitted tail.
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
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from paycore.core.ring_queue import RingQueue

from ..payment import Attempt, Payment

if TYPE_CHECKING:
    from ..metrics import Metrics

T = TypeVar("T")
U = TypeVar("U")
Deferred = T | asyncio.Future  # the value, or a future of it
# (default count, default cents, fallback count, fallback cents): integers of any size.
Totals = tuple[int, int, int, int]


class PaymentStatus(NamedTuple):
    """What became of an accepted payment (GET /payments/{id})."""

    payment: Payment
    settled: Attempt | None  # None: pending, not held by a processor yet


async def resolve(value: Deferred[T]) -> T:
    """The value of a deferred, for callers that may wait."""
    return await value if isinstance(value, asyncio.Future) else value


def then(value: Deferred[T], transform: Callable[[T], U],
         on_error: Callable[[BaseException], U] | None = None) -> Deferred[U]:
    """transform(value), or a future of it once value's future is done; a
    failed (or cancelled) future gives on_error(its error) instead, or
    without on_error fails the result with the same error."""
    if not isinstance(value, asyncio.Future):
        return transform(value)
    result = value.get_loop().create_future()

    def finish(done: asyncio.Future) -> None:
        if result.done():
            return
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        if error is None:
            result.set_result(transform(done.result()))
        elif on_error is None:
            result.set_exception(error)
        else:
            result.set_result(on_error(error))

    value.add_done_callback(finish)
    return result


class Acceptance(enum.IntEnum):
    ACCEPTED = 0     # the id is claimed and the payment pending, durably
    DUPLICATE = 1    # accepted before, same amount: nothing changes
    CONFLICT = 2     # accepted before with another amount
    BUSY = 3         # another instance is still making the same id durable: retry
    QUEUE_FULL = 4   # no room to keep one more pending payment


class PendingWork(Protocol):
    """The dispatcher, as a store sees it: where pending payments go."""

    def notify(self) -> None:
        """Payments were pushed onto the queue."""

    def resume(self, unsent: list[Payment], unresolved: list[Attempt]) -> None:
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

    async def start(self, queue: RingQueue, work: PendingWork) -> None:
        """Before serving: hand `work` what this instance left pending before a
        restart, and from then on feed pending payments onto `queue`."""

    # Grows each time accept() makes a promise that its answer may give only
    # once the store holds it: the mark to pass to after_durable.
    promised: int

    def accept(self, payment: Payment) -> Deferred[Acceptance]:
        """Claim the id and, when it is new, make the payment pending. An
        answer known at once promises it only after `after_durable(promised)`."""

    def after_durable(self, promise: int, callback: Callable[..., Any], *args: Any) -> None:
        """callback(*args) once the store holds everything promised up to the
        mark `promise` (a value `promised` had): at once when it does already."""

    def flush_waiting(self) -> None:
        """End of a batch (a read, a dispatcher pass): write what waits now,
        or, for records no answer waits on, soon (the store's choice)."""

    def sending(self, attempt: Attempt) -> Deferred[bool]:
        """Record where a payment is about to be sent, before it is. False:
        the payment is not this instance's to send (another instance took it
        over, or it was paid before, at any age); drop it."""

    def settle(self, attempt: Attempt) -> None:
        """The processor holds the payment: into the ledger, pending no more.
        A store shared across hosts, where an instance taken for dead may still
        finish a send, counts a second settle of the same payment as nothing.
        Nothing waits on it: if it is lost, the payment is still pending and
        whoever resumes it asks the processors first."""

    @property
    def settlement_room(self) -> int:
        """Settlements the store can take before it must catch up: the
        dispatcher sends no more payments than this at once."""

    def summary(self, from_ms: int | None, to_ms: int | None) -> Deferred[Totals]:
        """Totals by requestedAt, both bounds inclusive; None: unbounded."""

    def lookup(self, correlation_id: bytes) -> Deferred[PaymentStatus | None]:
        """What became of a payment: None if no instance accepted it (or its
        record is past the retention)."""

    def purge(self) -> Deferred[None]:
        """The ledger starts over (between test runs). Which ids were
        accepted is not forgotten, nor are payments still pending: they are
        still delivered, and a payment is never paid or counted twice."""

    def register_metrics(self, metrics: Metrics) -> None:
        """After start: the families the store reports itself."""

    async def close(self) -> None: ...
