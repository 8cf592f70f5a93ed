"""The processed payments: looked up by correlationId, totalled over requestedAt ranges."""
from bisect import bisect_left, bisect_right

from paycore.emulator.payments_file import PaymentsFile
from paycore.emulator.wire import PaymentRequest

# Blocks of at most this many payments keep both inserting anywhere and totalling a range
# at O(sqrt n): ~100k payments make ~200 blocks, each whole block counted by its running total.
_MAX_BLOCK_SIZE = 1024


class RequestedAtIndex:
    """Amounts in cents ordered by requestedAt (in microseconds), split into sorted blocks
    that each keep their total; every key in a block is <= every key in the next."""

    def __init__(self) -> None:
        self._block_keys: list[list[int]] = []
        self._block_cents: list[list[int]] = []
        self._block_totals: list[int] = []
        self._block_last_keys: list[int] = []
        self._count = 0
        self._total_cents = 0

    def add(self, key: int, cents: int) -> None:
        self._count += 1
        self._total_cents += cents
        if not self._block_keys:
            self._block_keys.append([key])
            self._block_cents.append([cents])
            self._block_totals.append(cents)
            self._block_last_keys.append(key)
            return
        block = min(bisect_left(self._block_last_keys, key), len(self._block_keys) - 1)
        keys = self._block_keys[block]
        position = bisect_right(keys, key)
        keys.insert(position, key)
        self._block_cents[block].insert(position, cents)
        self._block_totals[block] += cents
        self._block_last_keys[block] = keys[-1]
        if len(keys) > _MAX_BLOCK_SIZE:
            self._split(block)

    def _split(self, block: int) -> None:
        keys = self._block_keys[block]
        cents = self._block_cents[block]
        half = len(keys) // 2
        upper_keys, upper_cents = keys[half:], cents[half:]
        del keys[half:], cents[half:]
        upper_total = sum(upper_cents)
        self._block_totals[block] -= upper_total
        self._block_last_keys[block] = keys[-1]
        self._block_keys.insert(block + 1, upper_keys)
        self._block_cents.insert(block + 1, upper_cents)
        self._block_totals.insert(block + 1, upper_total)
        self._block_last_keys.insert(block + 1, upper_keys[-1])

    def totals(self, first: int | None, last: int | None) -> tuple[int, int]:
        """(count, cents) of the payments with first <= key <= last; None is unbounded."""
        if first is None and last is None:
            return self._count, self._total_cents
        if first is not None and last is not None and first > last:
            return 0, 0
        count = cents = 0
        start = 0 if first is None else bisect_left(self._block_last_keys, first)
        for block in range(start, len(self._block_keys)):
            keys = self._block_keys[block]
            if last is not None and keys[0] > last:
                break
            low = bisect_left(keys, first) if first is not None and keys[0] < first else 0
            high = bisect_right(keys, last) if last is not None and keys[-1] > last else len(keys)
            if low == 0 and high == len(keys):
                count += high
                cents += self._block_totals[block]
            else:
                count += high - low
                cents += sum(self._block_cents[block][low:high])
        return count, cents


class PaymentStore:
    """In memory; with a file, also kept there and read back at start."""

    def __init__(self, file: PaymentsFile | None = None) -> None:
        self._payments: dict[str, PaymentRequest] = {}
        self._index = RequestedAtIndex()
        self._file = None
        if file is not None:
            for payment in file.read():
                self.add(payment)
            self._file = file

    def __len__(self) -> int:
        return len(self._payments)

    def add(self, payment: PaymentRequest) -> bool:
        """Store the payment; False (and nothing stored) if its correlationId is already held."""
        if payment.correlation_id in self._payments:
            return False
        if self._file is not None:
            self._file.append(payment)
        self._payments[payment.correlation_id] = payment
        self._index.add(payment.requested_at_us, payment.cents)
        return True

    def get(self, correlation_id: str) -> PaymentRequest | None:
        return self._payments.get(correlation_id)

    def totals(self, first_us: int | None, last_us: int | None) -> tuple[int, int]:
        """(count, cents) of the payments requested within [first_us, last_us], bounds inclusive."""
        return self._index.totals(first_us, last_us)

    def purge(self) -> None:
        self._payments.clear()
        self._index = RequestedAtIndex()
        if self._file is not None:
            self._file.clear()
