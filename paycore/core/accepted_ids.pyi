from os import PathLike
from types import TracebackType
from typing import Final

# What claim() and remember() answer; state() reports CLAIMED or DURABLE.
CLAIMED: Final[int]      # claim: new, the caller owns it until confirm() or abandon()
DUPLICATE: Final[int]    # claim: durable with the same amount
CONFLICT: Final[int]     # durable (remember: or the caller's own claim) with another amount
IN_PROGRESS: Final[int]  # claimed by an instance, not durable yet: ask again shortly
DURABLE: Final[int]      # remember: durable in the current epoch with this amount
DEFAULT_SUBTABLES: Final[int]
DEFAULT_LOAD_FACTOR: Final[float]

class AcceptedIds:
    """The idempotency window: the correlationIds accepted by every service
    instance on the host within the last window_ms, in a file shared at path.

    The file is sized for `capacity` ids per window (53 bytes of file per id
    by default) and never grows: when more arrive, the oldest are forgotten
    sooner (effective_window_ms falls below window_ms, early_advances counts
    up) and no payment is refused. An id is remembered for at least
    window_ms and at most window_ms * subtables / (subtables - 1).

    A file of another geometry (capacity, window_ms, subtables, load_factor)
    is refused with ValueError: remove it to change them. Up to 64 instance
    names register in a file over its life (RuntimeError beyond).

    Use by the store:
    - a new payment: claim(); on CLAIMED journal it, then confirm() (or
      abandon() if the journal could not take it); IN_PROGRESS: another
      request for the same id is being journaled, answer once it is decided;
    - payments still pending keep their ids: remember() each of them again
      whenever `epoch` changes (the C-level remember_raw() and current_epoch()
      need no GIL, for the journal's writer thread);
    - at start: remember() what the journal holds as pending (its own
      claims among them become durable), then abandon() what
      claims_of_this_instance() still lists.
    """

    def __init__(
        self,
        path: str | bytes | PathLike[str] | PathLike[bytes],
        instance: str,
        capacity: int,
        window_ms: int,
        *,
        subtables: int = ...,
        load_factor: float = ...,
    ) -> None: ...
    @property
    def instance(self) -> str: ...
    def claim(self, uuid16: bytes, cents: int) -> int: ...
    def confirm(self, uuid16: bytes) -> bool: ...
    def abandon(self, uuid16: bytes) -> bool: ...
    def remember(self, uuid16: bytes, cents: int) -> int: ...
    def state(self, uuid16: bytes) -> tuple[int, int] | None: ...
    def claims_of_this_instance(self) -> list[bytes]: ...
    def close(self) -> None: ...
    def __enter__(self) -> AcceptedIds: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def window_ms(self) -> int: ...
    @property
    def epoch_ms(self) -> int: ...
    @property
    def subtables(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def file_bytes(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def effective_window_ms(self) -> int: ...
    @property
    def early_advances(self) -> int: ...
    @property
    def live_ids(self) -> int: ...
    @property
    def _now_ms(self) -> int: ...
    @_now_ms.setter
    def _now_ms(self, value: int | None) -> None: ...
