"""The processor's payments kept in a file (--payments-file), so that a processor
killed and started again still holds every payment it answered 200 for: one
line per payment, appended before the answer leaves; a purge empties the file.

A line is `correlationId cents requestedAt`; a line cut short by a kill was
never answered for and is dropped when the file is read back."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from paycore.emulator.wire import PaymentRequest, parse_timestamp


class PaymentsFile:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def read(self) -> Iterator[PaymentRequest]:
        """The payments kept, oldest first; a torn last line is cut off the file."""
        size = os.fstat(self._fd).st_size
        content = os.pread(self._fd, size, 0)
        whole = content.rfind(b"\n") + 1
        if whole < size:
            os.ftruncate(self._fd, whole)
        for line in content[:whole].splitlines():
            correlation_id, cents, requested_at = line.decode().split(" ")
            yield PaymentRequest(correlation_id, int(cents), requested_at, parse_timestamp(requested_at))

    def append(self, payment: PaymentRequest) -> None:
        os.write(self._fd, b"%s %d %s\n" % (payment.correlation_id.encode(), payment.cents,
                                            payment.requested_at.encode()))

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)
