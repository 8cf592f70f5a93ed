"""Who may call the operator's actions (POST /purge-payments): whoever holds
the admin token the operator configured (PAYCORE_ADMIN_TOKEN), sent as
`Authorization: Bearer <token>`. With no token configured nobody may."""
from __future__ import annotations

import enum
import hmac


class Verdict(enum.Enum):
    ALLOWED = 0
    NO_TOKEN_CONFIGURED = 1   # refused whatever the request carries: 403
    NOT_AUTHENTICATED = 2     # credentials missing or wrong: 403 too (SPEC §8)


class AdminToken:
    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        self._token = token.encode() if token else None

    def __repr__(self) -> str:
        return "AdminToken(configured)" if self._token else "AdminToken(none)"

    def check(self, authorization: bytes) -> Verdict:
        """authorization: the request's Authorization header value (b"" if none)."""
        if self._token is None:
            return Verdict.NO_TOKEN_CONFIGURED
        scheme, _, credentials = authorization.strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110 §11.1); the token is compared
        # in constant time, so its bytes cannot be guessed one at a time.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token):
            return Verdict.ALLOWED
        return Verdict.NOT_AUTHENTICATED
