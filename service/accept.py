"""POST /payments: parse, claim the correlationId, queue, answer at once."""
from __future__ import annotations

from collections.abc import Callable

from paycore.core.accepted_ids import CLAIMED, CONFLICT, DUPLICATE, AcceptedIds
from paycore.core.payment_parser import InvalidPayment, parse_payment
from paycore.core.ring_queue import RingQueue

from . import responses
from .journal import JournalWriter

QUEUE_FULL = responses.error_response(
    503, "too many payments waiting, retry shortly", b"Retry-After: 1\r\n")
IDS_FULL = responses.error_response(
    503, "accepted-payment registry is full", b"Retry-After: 5\r\n")
SHUTTING_DOWN = responses.error_response(
    503, "this instance is shutting down, retry", b"Retry-After: 1\r\n")
CONFLICTING_DUPLICATE = responses.error_response(
    409, "correlationId already accepted with a different amount")

_ERROR_RESPONSES: dict[tuple[int, str], bytes] = {}


def _rejection(error: InvalidPayment) -> bytes:
    key = (error.http_status, error.message)
    response = _ERROR_RESPONSES.get(key)
    if response is None:
        response = _ERROR_RESPONSES[key] = responses.error_response(*key)
    return response


class PaymentIntake:
    """A 2xx leaves here only once the payment is queued and journaled (the
    journal holds the answer back until its batch is written); nothing else waits."""

    def __init__(self, accepted_ids: AcceptedIds, queue: RingQueue, journal: JournalWriter,
                 on_queued: Callable[[], None]) -> None:
        self._accepted_ids = accepted_ids
        self._queue = queue
        self._journal = journal
        self._on_queued = on_queued
        self._accepting = True

    def stop_accepting(self) -> None:
        """From now on new payments are refused (503): the instance is draining."""
        self._accepting = False

    def accept(self, body: bytes) -> bytes:
        try:
            uuid16, cents = parse_payment(body)
        except InvalidPayment as error:
            return _rejection(error)
        if not self._accepting:
            return SHUTTING_DOWN
        # Checked before the claim, so a claimed payment always fits the queue.
        if self._queue.is_full:
            return QUEUE_FULL
        claim = self._accepted_ids.claim(uuid16, cents)
        if claim == CLAIMED:
            self._queue.push(uuid16, cents)
            self._journal.accepted(uuid16, cents)
            self._on_queued()
            return responses.ACCEPTED
        if claim == DUPLICATE:
            return responses.ALREADY_ACCEPTED
        if claim == CONFLICT:
            return CONFLICTING_DUPLICATE
        return IDS_FULL
