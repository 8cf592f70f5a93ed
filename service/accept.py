"""POST /payments: parse, then the store claims the correlationId and keeps
the payment pending; the answer says which."""
from __future__ import annotations

from paycore.core.payment_parser import InvalidPayment, parse_payment

from . import responses
from .payment import Payment
from .store.base import Acceptance, Deferred, Store, then

SHUTTING_DOWN = responses.error_response(
    503, "this instance is shutting down, retry", b"Retry-After: 1\r\n")
_ANSWERS = {
    Acceptance.ACCEPTED: responses.ACCEPTED,
    Acceptance.DUPLICATE: responses.ALREADY_ACCEPTED,
    Acceptance.CONFLICT: responses.error_response(
        409, "correlationId already accepted with a different amount"),
    Acceptance.BUSY: responses.error_response(
        503, "this correlationId is being accepted by another request, retry", b"Retry-After: 1\r\n"),
    Acceptance.QUEUE_FULL: responses.error_response(
        503, "too many payments waiting, retry shortly", b"Retry-After: 1\r\n"),
}

_ERROR_RESPONSES: dict[tuple[int, str], bytes] = {}


def _rejection(error: InvalidPayment) -> bytes:
    key = (error.http_status, error.message)
    response = _ERROR_RESPONSES.get(key)
    if response is None:
        response = _ERROR_RESPONSES[key] = responses.error_response(*key)
    return response


def _answer(acceptance: Acceptance) -> bytes:
    return _ANSWERS[acceptance]


class PaymentIntake:
    """A 2xx leaves only once the store holds the payment (the store's
    after_durable holds the answer back until then); nothing else waits."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._accepting = True

    def stop_accepting(self) -> None:
        """From now on new payments are refused (503): the instance is draining."""
        self._accepting = False

    def accept(self, body: bytes) -> Deferred[bytes]:
        try:
            payment = Payment(*parse_payment(body))
        except InvalidPayment as error:
            return _rejection(error)
        if not self._accepting:
            return SHUTTING_DOWN
        return then(self._store.accept(payment), _answer, responses.store_unavailable)
