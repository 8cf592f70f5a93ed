"""Which handler answers a request; every handler is synchronous and returns bytes."""
from __future__ import annotations

from paycore.core.accepted_ids import AcceptedIds
from paycore.core.ledger import Ledger

from . import responses
from .accept import PaymentIntake
from .summary import Summary


class Routes:
    def __init__(self, intake: PaymentIntake, summary: Summary, ledger: Ledger,
                 accepted_ids: AcceptedIds) -> None:
        self._intake = intake
        self._summary = summary
        self._ledger = ledger
        self._accepted_ids = accepted_ids

    def handle(self, method: bytes, url: bytes, body: bytes) -> bytes:
        path, _, query = url.partition(b"?")
        if path == b"/payments":
            if method == b"POST":
                return self._intake.accept(body)
        elif path == b"/payments-summary":
            if method == b"GET":
                return self._summary.respond(query)
        elif path == b"/purge-payments":
            if method == b"POST":
                return self._purge()
        else:
            return responses.NOT_FOUND
        return responses.METHOD_NOT_ALLOWED

    def _purge(self) -> bytes:
        """Every instance's ledger and the accepted ids start over (between test runs)."""
        self._ledger.purge()
        self._accepted_ids.purge()
        return responses.PURGED
