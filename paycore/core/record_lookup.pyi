from enum import IntEnum

class LookupStatus(IntEnum):
    ABSENT = 0
    FOUND = 1
    FAILED = 2

# (uuid16, status, cents, processor, requested_at_ms, SQLite result code if FAILED)
LookupAnswer = tuple[bytes, int, int, int, int, int]

class RecordLookup:
    """Lookups of correlationIds in the payments record at `path`, answered
    by serve() on a thread of its own that never takes the GIL."""

    path: str
    event_fd: int
    def __init__(self, path: str) -> None: ...
    def ask(self, correlation_ids: list[bytes]) -> None: ...
    def answers(self) -> list[LookupAnswer]: ...
    def serve(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
