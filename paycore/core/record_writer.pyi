from collections.abc import Sequence
from typing import Any

# (cents, processor, requested_at_ms, generation) of a row a commit inserted
FreshRow = tuple[int, int, int, int]

class RecordWriter:
    """Commits settlements into the payments record at `path` on a
    connection of its own, each whole transaction without the GIL. setup:
    a script run once on the connection; statements: the SQL a commit runs
    between BEGIN IMMEDIATE and COMMIT (record_sql.COMMIT_STATEMENTS)."""

    path: str
    def __init__(self, path: str, setup: str, statements: Sequence[str], busy_timeout_ms: int) -> None: ...
    def commit(self, instance: str, settlements: Sequence[Sequence[Any]], through_seq: int) -> list[FreshRow] | None: ...
    def close(self) -> None: ...
