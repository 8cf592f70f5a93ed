"""Complete HTTP/1.1 responses as bytes; the fixed ones are built once."""
from __future__ import annotations

import logging
from http import HTTPStatus

import orjson

log = logging.getLogger("paycore.responses")


# Looked up by number: an enum call per response is slow when the path is cold.
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def http_response(status: int, body: bytes = b"", headers: bytes = b"",
                  content_type: bytes = b"application/json") -> bytes:
    reason = _REASONS[status]
    content_type_header = b"Content-Type: %s\r\n" % content_type if body else b""
    return (b"HTTP/1.1 %d %s\r\n%s%sContent-Length: %d\r\n\r\n"
            % (status, reason, content_type_header, headers, len(body)) + body)


def error_response(status: int, message: str, headers: bytes = b"") -> bytes:
    return http_response(status, orjson.dumps({"error": message}), headers)


ACCEPTED = http_response(202)
ALREADY_ACCEPTED = http_response(200, orjson.dumps({"message": "payment already accepted"}))
NOT_FOUND = error_response(404, "no such endpoint")
METHOD_NOT_ALLOWED = error_response(405, "method not allowed")
BODY_TOO_LARGE = error_response(413, "body too large")
HEAD_TOO_LARGE = error_response(431, "request line and headers too large")
REQUEST_TIMEOUT = error_response(408, "request not received in time")
TOO_MANY_CONNECTIONS = error_response(503, "too many connections", b"Retry-After: 1\r\n")
BAD_REQUEST = error_response(400, "malformed HTTP request")
PURGED = http_response(200, orjson.dumps({"message": "all payments purged"}))
STORE_UNAVAILABLE = error_response(503, "payment store unavailable, retry shortly", b"Retry-After: 1\r\n")


def store_unavailable(error: BaseException) -> bytes:
    """The answer when the store could not answer (Redis down or refusing)."""
    log.warning("payment store unavailable: %r", error)
    return STORE_UNAVAILABLE
