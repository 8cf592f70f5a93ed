"""Which handler answers a request: the answer, or a future of it when the
store answers later."""
from __future__ import annotations

from . import responses
from .accept import PaymentIntake
from .admin import AdminToken, Verdict
from .lookup import PaymentLookup
from .metrics import Metrics
from .store.base import Deferred, Store, then
from .summary import Summary


_REFUSED = {Verdict.NO_TOKEN_CONFIGURED: responses.FORBIDDEN, Verdict.NOT_AUTHENTICATED: responses.ADMIN_TOKEN_REQUIRED}


class Routes:
    def __init__(self, intake: PaymentIntake, summary: Summary, lookup: PaymentLookup, store: Store,
                 metrics: Metrics, admin: AdminToken) -> None:
        self._intake = intake
        self._summary = summary
        self._lookup = lookup
        self._store = store
        self._metrics = metrics
        self._admin = admin
        # The route labels its answers are counted under.
        self._payments_route = metrics.route("/payments")
        self._summary_route = metrics.route("/payments-summary")
        self._lookup_route = metrics.route("/payments/{id}")
        self._purge_route = metrics.route("/purge-payments")

    def handle(self, method: bytes, url: bytes, body: bytes, authorization: bytes) -> Deferred[bytes]:
        path, _, query = url.partition(b"?")
        if path == b"/payments":
            route = self._payments_route
            response = self._intake.accept(body) if method == b"POST" else responses.METHOD_NOT_ALLOWED
        elif path == b"/payments-summary":
            route = self._summary_route
            response = self._summary.respond(query) if method == b"GET" else responses.METHOD_NOT_ALLOWED
        elif path.startswith(b"/payments/"):
            route = self._lookup_route
            response = (self._lookup.respond(path[len(b"/payments/"):]) if method == b"GET"
                        else responses.METHOD_NOT_ALLOWED)
        elif path == b"/purge-payments":
            route = self._purge_route
            response = self._purge(authorization) if method == b"POST" else responses.METHOD_NOT_ALLOWED
        else:
            route = self._metrics.unserved
            response = responses.NOT_FOUND
        if isinstance(response, bytes):
            self._metrics.responded(route, response)
        else:
            response.add_done_callback(lambda answer: self._metrics.responded(route, answer.result()))
        return response

    def _purge(self, authorization: bytes) -> Deferred[bytes]:
        """Every instance's ledger starts over: an operator's action, never a client's."""
        verdict = self._admin.check(authorization)
        if verdict is not Verdict.ALLOWED:
            return _REFUSED[verdict]
        return then(self._store.purge(), _purged, responses.store_unavailable)


def _purged(_: None) -> bytes:
    return responses.PURGED
