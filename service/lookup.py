"""GET /payments/{correlationId}: what became of a payment, so a client that
lost an answer can reconcile without posting again."""
from __future__ import annotations

from paycore.core.amount import format_amount
from paycore.core.correlation_id import uuid_to_bytes, uuid_to_text
from paycore.core.timestamp import format_timestamp

from . import responses
from .router import PROCESSOR_NAMES
from .store.base import Deferred, PaymentStatus, Store, then

NOT_A_UUID = responses.error_response(400, "the path must end in a correlationId (a UUID)")
UNKNOWN = responses.error_response(404, "no payment with this correlationId was accepted")


class PaymentLookup:
    def __init__(self, store: Store) -> None:
        self._store = store

    def respond(self, correlation_id_text: bytes) -> Deferred[bytes]:
        try:
            correlation_id = uuid_to_bytes(correlation_id_text)
        except ValueError:
            return NOT_A_UUID
        return then(self._store.lookup(correlation_id), _status_response, responses.store_unavailable)


def _status_response(status: PaymentStatus | None) -> bytes:
    if status is None:
        return UNKNOWN
    payment, settled = status
    # Written by hand: the amount is exact decimal text, which no JSON library writes from cents.
    fields = [b'"correlationId":"%s"' % uuid_to_text(payment.correlation_id).encode(),
              b'"amount":%s' % format_amount(payment.cents).encode()]
    if settled is None:
        fields.append(b'"status":"pending"')
    else:
        fields += [b'"status":"settled"',
                   b'"processor":"%s"' % PROCESSOR_NAMES[settled.processor].encode(),
                   b'"requestedAt":"%s"' % format_timestamp(settled.requested_at_ms).encode()]
    return responses.http_response(200, b"{" + b",".join(fields) + b"}")
