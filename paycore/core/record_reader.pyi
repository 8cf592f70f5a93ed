from enum import IntEnum

class LookupStatus(IntEnum):
    ABSENT = 0
    FOUND = 1
    FAILED = 2

# (uuid16, status, cents, processor, requested_at_ms, SQLite result code if FAILED)
LookupAnswer = tuple[bytes, int, int, int, int, int]
# (0, (default count, default cents, fallback count, fallback cents), {instance: committed journal seq}),
# or (SQLite result code, None, None)
SummaryAnswer = tuple[int, tuple[int, int, int, int] | None, dict[str, int] | None]

class RecordReader:
    """Lookups of correlationIds and summaries in the payments record at
    `path`, answered by serve() on a thread of its own that never takes the GIL."""

    path: str
    event_fd: int
    def __init__(self, path: str, summary_statements: list[str]) -> None: ...
    def ask(self, correlation_ids: list[bytes]) -> None: ...
    def ask_summary(self, statement: int, parameters: list[int]) -> None: ...
    def answers(self) -> tuple[list[LookupAnswer], list[SummaryAnswer]]: ...
    def serve(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...

class InlineReads:
    """Lookups and summaries of the record at `path` answered at once on the
    caller's thread: for reads that wait for no device, as every read of a
    record in memory (in_memory(path)). A lock held by another connection
    gives FAILED (a lookup) or SQLITE_BUSY (a summary's error) at once
    instead of a wait."""

    path: str
    @staticmethod
    def in_memory(path: str) -> bool: ...
    def __init__(self, path: str, summary_statements: list[str]) -> None: ...
    def lookup(self, correlation_ids: list[bytes]) -> list[LookupAnswer]: ...
    def summary(self, statement: int, parameters: list[int]) -> SummaryAnswer: ...
    def close(self) -> None: ...
