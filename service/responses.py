"""Complete HTTP/1.1 responses as bytes; the fixed ones are built once, with
their variants for a connection that ends after them (`Connection: close`)
and for an HTTP/1.0 client that asked to keep it (`Connection: keep-alive`)."""
from __future__ import annotations

import logging
from http import HTTPStatus

import orjson

log = logging.getLogger("paycore.responses")


# Looked up by number: an enum call per response is slow when the path is cold.
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}

# Connection options an answer may carry (RFC 9112 §9.3, §9.6).
CLOSE = b"close"
KEEP_ALIVE = b"keep-alive"
_VARIANTS: dict[bytes, dict[bytes, bytes]] = {CLOSE: {}, KEEP_ALIVE: {}}


def http_response(status: int, body: bytes = b"", headers: bytes = b"",
                  content_type: bytes = b"application/json") -> bytes:
    reason = _REASONS[status]
    content_type_header = b"Content-Type: %s\r\n" % content_type if body else b""
    return (b"HTTP/1.1 %d %s\r\n%s%sContent-Length: %d\r\n\r\n"
            % (status, reason, content_type_header, headers, len(body)) + body)


def fixed_response(status: int, body: bytes = b"", headers: bytes = b"") -> bytes:
    """An answer given many times: its variants are built now, not per request."""
    response = http_response(status, body, headers)
    for option, variants in _VARIANTS.items():
        variants[response] = _with_connection(response, option)
    return response


def error_response(status: int, message: str, headers: bytes = b"") -> bytes:
    return fixed_response(status, orjson.dumps({"error": message}), headers)


def with_connection(response: bytes, option: bytes) -> bytes:
    """response carrying `Connection: <option>` (CLOSE or KEEP_ALIVE)."""
    variant = _VARIANTS[option].get(response)
    return variant if variant is not None else _with_connection(response, option)


def _with_connection(response: bytes, option: bytes) -> bytes:
    status_line_end = response.index(b"\r\n") + 2
    return b"%sConnection: %s\r\n%s" % (response[:status_line_end], option, response[status_line_end:])


# An interim answer (RFC 9110 §15.2.1): the client may send the body it announced.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ACCEPTED = fixed_response(202)
ALREADY_ACCEPTED = fixed_response(200, orjson.dumps({"message": "payment already accepted"}))
NOT_FOUND = error_response(404, "no such endpoint")
METHOD_NOT_ALLOWED = error_response(405, "method not allowed")
BODY_TOO_LARGE = error_response(413, "body too large")
HEAD_TOO_LARGE = error_response(431, "request line and headers too large")
REQUEST_TIMEOUT = error_response(408, "request not received in time")
TOO_MANY_CONNECTIONS = error_response(503, "too many connections", b"Retry-After: 1\r\n")
BAD_REQUEST = error_response(400, "malformed HTTP request")
PURGED = fixed_response(200, orjson.dumps({"message": "all payments purged"}))
ADMIN_TOKEN_REQUIRED = error_response(403, "this needs the admin token: Authorization: Bearer <token>")
FORBIDDEN = error_response(403, "no admin token is configured (PAYCORE_ADMIN_TOKEN): purging is disabled")
STORE_UNAVAILABLE = error_response(503, "payment store unavailable, retry shortly", b"Retry-After: 1\r\n")


def store_unavailable(error: BaseException) -> bytes:
    """The answer when the store could not answer (Redis down or refusing)."""
    log.warning("payment store unavailable: %r", error)
    return STORE_UNAVAILABLE
