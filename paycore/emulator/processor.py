"""The payment processor's endpoints and routing."""
import asyncio
from collections.abc import Awaitable, Callable
from fractions import Fraction
from math import ceil
from urllib.parse import parse_qsl

import orjson

from paycore.emulator.admission import AdmissionGate
from paycore.emulator.config import ProcessorConfig
from paycore.emulator.health import HealthRateLimiter
from paycore.emulator.payments_file import PaymentsFile
from paycore.emulator.server import Handler, Request, Response, start_http_server
from paycore.emulator.store import PaymentStore
from paycore.emulator.wire import (
    InvalidRequest,
    PaymentRequest,
    decode_delay,
    decode_object_field,
    decode_payment_request,
    format_cents,
    parse_correlation_id,
    parse_timestamp,
)

MAX_HEALTH_WAITING = 2

PAYMENT_PROCESSED = Response(200, b'{"message":"payment processed successfully"}')
PAYMENT_FAILED = Response(500)
PAYMENTS_TOO_MANY = Response(429, b'{"message":"too many payments in progress"}', b"Retry-After: 5\r\n")
PAYMENTS_PURGED = Response(200, b'{"message":"All payments purged."}')
TOKEN_CHANGED = Response(204)
NOT_FOUND = Response(404, b'{"message":"not found"}')
UNAUTHORIZED = Response(401, b'{"message":"invalid or missing X-Rinha-Token"}')

_PAYMENT_PATH_PREFIX = b"/payments/"
_Routes = dict[bytes, Handler]


def _bad_request(error: InvalidRequest) -> Response:
    return Response(400, orjson.dumps({"message": str(error)}))


def _optional_timestamp(text: str | None) -> int | None:
    """An absent or empty bound leaves that side of the range open."""
    return parse_timestamp(text) if text else None


def _config_changed(name: str, was: object, now: object) -> Response:
    return Response(200, orjson.dumps({"config": name, "was": was, "is": now}))


class PaymentProcessor:
    """Answers requests the way the challenge's payment processor does; `handle` is the
    HTTP entry point, `config` and `store` may be read and changed directly."""

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config
        self.store = PaymentStore(PaymentsFile(config.payments_file) if config.payments_file else None)
        self._admission = AdmissionGate(config.max_inflight, config.max_queued)
        self._health_limiter = HealthRateLimiter(config.health_interval, MAX_HEALTH_WAITING)
        self._health_refused = Response(
            429, b'{"message":"health check rate limit exceeded"}', b"Retry-After: %d\r\n" % ceil(config.health_interval)
        )
        self._routes: dict[bytes, _Routes] = {
            b"/payments": {b"POST": self._post_payment},
            b"/payments/service-health": {b"GET": self._health},
            b"/admin/payments-summary": {b"GET": self._admin(self._summary)},
            b"/admin/configurations/token": {b"PUT": self._admin(self._set_token)},
            b"/admin/configurations/delay": {b"PUT": self._admin(self._set_delay)},
            b"/admin/configurations/failure": {b"PUT": self._admin(self._set_failure)},
            b"/admin/purge-payments": {b"POST": self._admin(self._purge)},
        }
        self._payment_lookup_routes: _Routes = {b"GET": self._get_payment}

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await start_http_server(self.handle, host, port)

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        routes = self._routes.get(request.path)
        if routes is None:
            if not self._is_payment_lookup(request.path):
                return NOT_FOUND
            routes = self._payment_lookup_routes
        handler = routes.get(request.method)
        if handler is None:
            return Response(405, b'{"message":"method not allowed"}', b"Allow: %s\r\n" % b", ".join(routes))
        return handler(request)

    @staticmethod
    def _is_payment_lookup(path: bytes) -> bool:
        return (
            path.startswith(_PAYMENT_PATH_PREFIX)
            and len(path) > len(_PAYMENT_PATH_PREFIX)
            and b"/" not in path[len(_PAYMENT_PATH_PREFIX) :]
        )

    def _admin(self, handler: Callable[[Request], Response]) -> Handler:
        def with_token(request: Request) -> Response:
            if request.token is None or request.token != self.config.token.encode():
                return UNAUTHORIZED
            return handler(request)

        return with_token

    # payments

    def _post_payment(self, request: Request) -> Response | Awaitable[Response]:
        try:
            payment = decode_payment_request(request.body)
        except InvalidRequest as error:
            return _bad_request(error)
        slot = self._admission.try_admit()
        if slot is None:
            return PAYMENTS_TOO_MANY
        if slot.done() and not self.config.delay_ms:
            return self._settle_and_release(payment)
        # Timers and callbacks rather than a task per payment: under the benchmark's delays
        # this emulator shares the CPUs with the service it measures.
        answer = slot.get_loop().create_future()
        if slot.done():
            self._start_processing(answer, payment)
        else:
            slot.add_done_callback(lambda _: self._start_processing(answer, payment))
        return answer

    def _start_processing(self, answer: asyncio.Future[Response], payment: PaymentRequest) -> None:
        """The payment holds an in-flight slot from now on, for the delay configured now."""
        delay_s = self.config.delay_ms / 1000
        answer.get_loop().call_later(delay_s, self._finish_processing, answer, payment)

    def _finish_processing(self, answer: asyncio.Future[Response], payment: PaymentRequest) -> None:
        # Once admitted, a payment is processed to the end even if its client hung up
        # (the answer cancelled): only the wait for the answer went away with the connection.
        response = self._settle_and_release(payment)
        if not answer.cancelled():
            answer.set_result(response)

    def _settle_and_release(self, payment: PaymentRequest) -> Response:
        try:
            return self._settle(payment)
        finally:
            self._admission.release()

    def _settle(self, payment: PaymentRequest) -> Response:
        if self.config.failing:
            return PAYMENT_FAILED
        if not self.store.add(payment):
            return Response(
                422,
                orjson.dumps(
                    {"message": f"Payment could not be processed. CorrelationId already exists: {payment.correlation_id}"}
                ),
            )
        return PAYMENT_PROCESSED

    def _get_payment(self, request: Request) -> Response:
        try:
            correlation_id = parse_correlation_id(request.path[len(_PAYMENT_PATH_PREFIX) :].decode("latin-1"))
        except InvalidRequest as error:
            return _bad_request(error)
        payment = self.store.get(correlation_id)
        if payment is None:
            return NOT_FOUND
        body = b'{"correlationId":"%s","amount":%s,"requestedAt":%s}' % (
            correlation_id.encode(),
            format_cents(payment.cents),
            orjson.dumps(payment.requested_at),
        )
        return Response(200, body)

    # health

    def _health(self, request: Request) -> Response | Awaitable[Response]:
        permit = self._health_limiter.try_acquire()
        if permit is None:
            return self._health_refused
        if permit.done():
            return self._health_status()
        return self._health_after(permit)

    async def _health_after(self, permit: asyncio.Future[None]) -> Response:
        await permit
        return self._health_status()

    def _health_status(self) -> Response:
        return Response(200, orjson.dumps({"failing": self.config.failing, "minResponseTime": self.config.delay_ms}))

    # admin

    def _summary(self, request: Request) -> Response:
        bounds = dict(parse_qsl(request.query.decode("latin-1"))) if request.query else {}
        try:
            first_us = _optional_timestamp(bounds.get("from"))
            last_us = _optional_timestamp(bounds.get("to"))
        except InvalidRequest as error:
            return _bad_request(error)
        count, cents = self.store.totals(first_us, last_us)
        fee = self.config.fee
        fee_cents = round(cents * Fraction(fee))
        body = b'{"totalAmount":%s,"totalRequests":%d,"totalFee":%s,"feePerTransaction":%s}' % (
            format_cents(cents),
            count,
            format_cents(fee_cents),
            str(fee).encode(),
        )
        return Response(200, body)

    def _set_token(self, request: Request) -> Response:
        try:
            self.config.token = decode_object_field(request.body, "token", str)
        except InvalidRequest as error:
            return _bad_request(error)
        return TOKEN_CHANGED

    def _set_delay(self, request: Request) -> Response:
        try:
            delay_ms = decode_delay(request.body)
        except InvalidRequest as error:
            return _bad_request(error)
        was, self.config.delay_ms = self.config.delay_ms, delay_ms
        return _config_changed("delay", was, delay_ms)

    def _set_failure(self, request: Request) -> Response:
        try:
            failing = decode_object_field(request.body, "failure", bool)
        except InvalidRequest as error:
            return _bad_request(error)
        was, self.config.failing = self.config.failing, failing
        return _config_changed("failure", was, failing)

    def _purge(self, request: Request) -> Response:
        self.store.purge()
        return PAYMENTS_PURGED
