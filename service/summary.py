"""GET /payments-summary: one exact answer from the store's ledger, which
every instance shares."""
from __future__ import annotations

from urllib.parse import unquote

from paycore.core.amount import format_amount
from paycore.core.timestamp import parse_timestamp

from . import responses
from .store.base import Deferred, Store, Totals, then


def _bound(value: bytes | None, round_up: bool) -> int | None:
    if value is None or value == b"":
        return None
    # unquote, not unquote_plus: a '+' in a UTC offset is literal.
    return parse_timestamp(unquote(value.decode("latin-1")), round_up)


def _query_params(query: bytes) -> dict[bytes, bytes]:
    params: dict[bytes, bytes] = {}
    for pair in query.split(b"&"):
        if pair:
            name, _, value = pair.partition(b"=")
            params[name] = value
    return params


class Summary:
    def __init__(self, store: Store) -> None:
        self._store = store

    def respond(self, query: bytes) -> Deferred[bytes]:
        params = _query_params(query)
        try:
            # Inclusive bounds at millisecond precision: a lower bound with finer
            # digits starts at the next millisecond, an upper one ends at its own.
            from_ms = _bound(params.get(b"from"), round_up=True)
            to_ms = _bound(params.get(b"to"), round_up=False)
        except ValueError:
            return responses.error_response(400, "from and to must be ISO-8601 timestamps")
        return then(self._store.summary(from_ms, to_ms), _summary_response, responses.store_unavailable)


def _summary_response(totals: Totals) -> bytes:
    default_count, default_cents, fallback_count, fallback_cents = totals
    body = (b'{"default":{"totalRequests":%d,"totalAmount":%s},'
            b'"fallback":{"totalRequests":%d,"totalAmount":%s}}'
            % (default_count, format_amount(default_cents).encode(),
               fallback_count, format_amount(fallback_cents).encode()))
    return responses.http_response(200, body)
