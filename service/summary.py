"""GET /payments-summary: one exact answer from the store's ledger, which
every instance shares."""
from __future__ import annotations

from paycore.core.summary_codec import summary_body, summary_range

from . import responses
from .store.base import Deferred, Store, Totals, then

BAD_RANGE = responses.error_response(400, "from and to must be ISO-8601 timestamps")


class Summary:
    def __init__(self, store: Store) -> None:
        self._store = store

    def respond(self, query: bytes) -> Deferred[bytes]:
        try:
            from_ms, to_ms = summary_range(query)
        except ValueError:
            return BAD_RANGE
        return then(self._store.summary(from_ms, to_ms), _summary_response, responses.store_unavailable)


def _summary_response(totals: Totals) -> bytes:
    return responses.http_response(200, summary_body(totals))
