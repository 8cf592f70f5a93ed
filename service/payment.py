"""What the service carries about a payment, named: a `Payment` as a client
posted it, and an `Attempt`, that payment sent to a processor with a
requestedAt (or held by one, once settled)."""
from __future__ import annotations

from typing import NamedTuple


class Payment(NamedTuple):
    correlation_id: bytes  # the UUID's 16 bytes
    cents: int


class Attempt(NamedTuple):
    payment: Payment
    processor: int         # 0 default, 1 fallback (router.DEFAULT / router.FALLBACK)
    requested_at_ms: int   # what the processor holds, and what summaries filter on
