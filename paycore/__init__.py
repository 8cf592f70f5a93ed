"""paycore: a payment intermediary with a Cython core.

The compiled core, for programs and benchmarks that use it as a library:

    from paycore import parse_payment, Ledger
    uuid16, cents = parse_payment(b'{"correlationId": "...", "amount": 20.05}')

The service itself is `python -m paycore.service` (configured by environment
variables, see the README); `paycore.stack` runs the local topology and
`paycore.emulator` the payment-processor emulator.
"""
from paycore.core.accepted_ids import CLAIMED, CONFLICT, DUPLICATE, DURABLE, IN_PROGRESS, AcceptedIds
from paycore.core.amount import MAX_CENTS, AmountError, format_amount, parse_amount
from paycore.core.correlation_id import uuid_to_bytes, uuid_to_text
from paycore.core.journal import Journal, RecordKind
from paycore.core.ledger_tail import LedgerTail
from paycore.core.payment_parser import InvalidPayment, parse_payment
from paycore.core.processor_payload import encode_payment
from paycore.core.ring_queue import RingQueue
from paycore.core.timestamp import format_timestamp, parse_timestamp

__all__ = [
    "CLAIMED", "CONFLICT", "DUPLICATE", "DURABLE", "IN_PROGRESS", "MAX_CENTS",
    "AcceptedIds", "AmountError", "InvalidPayment", "Journal", "LedgerTail", "RecordKind", "RingQueue",
    "encode_payment", "format_amount", "format_timestamp", "parse_amount", "parse_payment",
    "parse_timestamp", "uuid_to_bytes", "uuid_to_text",
]
