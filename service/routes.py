"""Which handler answers a request; every handler is synchronous and returns bytes."""
from __future__ import annotations

from paycore.core.accepted_ids import AcceptedIds
from paycore.core.ledger import Ledger

from . import responses
from .accept import PaymentIntake
from .metrics import OTHER, PAYMENTS, PURGE, SUMMARY, Metrics
from .summary import Summary


class Routes:
    def __init__(self, intake: PaymentIntake, summary: Summary, ledger: Ledger,
                 accepted_ids: AcceptedIds, metrics: Metrics) -> None:
        self._intake = intake
        self._summary = summary
        self._ledger = ledger
        self._accepted_ids = accepted_ids
        self._metrics = metrics

    def handle(self, method: bytes, url: bytes, body: bytes) -> bytes:
        path, _, query = url.partition(b"?")
        if path == b"/payments":
            route = PAYMENTS
            response = self._intake.accept(body) if method == b"POST" else responses.METHOD_NOT_ALLOWED
        elif path == b"/payments-summary":
            route = SUMMARY
            response = self._summary.respond(query) if method == b"GET" else responses.METHOD_NOT_ALLOWED
        elif path == b"/purge-payments":
            route = PURGE
            response = self._purge() if method == b"POST" else responses.METHOD_NOT_ALLOWED
        else:
            route = OTHER
            response = responses.NOT_FOUND
        self._metrics.responded(route, response)
        return response

    def _purge(self) -> bytes:
        """Every instance's ledger and the accepted ids start over (between test runs)."""
        self._ledger.purge()
        self._accepted_ids.purge()
        return responses.PURGED
