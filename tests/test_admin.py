"""POST /purge-payments is an operator's action: it needs PAYCORE_ADMIN_TOKEN."""
from __future__ import annotations

import hmac
import uuid

import pytest
from conftest import TEST_EMULATOR_ARGS, TEST_INSTANCE_ENV, RunningStack, call
from test_service import ZERO, as_summary, payment

from paycore.service.admin import AdminToken, Verdict
from paycore.service.config import Settings
from paycore.stack import Stack, StackSettings

TOKEN = "an-operator-token"


@pytest.mark.parametrize("authorization, verdict", [
    (b"Bearer an-operator-token", Verdict.ALLOWED),
    (b"bearer an-operator-token", Verdict.ALLOWED),
    (b"BEARER   an-operator-token ", Verdict.ALLOWED),
    (b"", Verdict.NOT_AUTHENTICATED),
    (b"Bearer", Verdict.NOT_AUTHENTICATED),
    (b"Bearer ", Verdict.NOT_AUTHENTICATED),
    (b"an-operator-token", Verdict.NOT_AUTHENTICATED),
    (b"Basic an-operator-token", Verdict.NOT_AUTHENTICATED),
    (b"Bearer an-operator-toke", Verdict.NOT_AUTHENTICATED),
    (b"Bearer an-operator-token2", Verdict.NOT_AUTHENTICATED),
    (b"Bearer AN-OPERATOR-TOKEN", Verdict.NOT_AUTHENTICATED),
])
def test_only_the_configured_bearer_token_is_allowed(authorization, verdict):
    assert AdminToken(TOKEN).check(authorization) is verdict


def test_with_no_token_configured_nobody_is_allowed():
    for authorization in (b"", b"Bearer ", b"Bearer an-operator-token"):
        assert AdminToken("").check(authorization) is Verdict.NO_TOKEN_CONFIGURED


def test_the_token_is_compared_in_constant_time(monkeypatch):
    compared = []

    def compare_digest(a, b):
        compared.append((a, b))
        return a == b
    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    assert AdminToken(TOKEN).check(b"Bearer guess") is Verdict.NOT_AUTHENTICATED
    assert compared == [(b"guess", TOKEN.encode())]


def test_the_token_is_not_in_the_settings_or_the_checks_repr():
    assert TOKEN not in repr(Settings(admin_token=TOKEN, metrics_listen=""))
    assert TOKEN not in repr(AdminToken(TOKEN))


def test_without_a_token_configured_a_purge_is_refused_and_erases_nothing():
    settings = StackSettings(port=0, default_port=0, fallback_port=0, quiet=True,
                             emulator_args=TEST_EMULATOR_ARGS, instance_env=TEST_INSTANCE_ENV, admin_token="")
    with Stack(settings) as stack:
        live = RunningStack(stack)
        assert call(live.client(), "POST", "/payments", payment(str(uuid.uuid4())))[0] == 202
        processed = live.wait_until_processed(1)
        for headers in ({}, live.admin_headers, {"Authorization": "Bearer "}):
            status, body = call(live.client(), "POST", "/purge-payments", headers=headers)
            assert status == 403 and "PAYCORE_ADMIN_TOKEN" in body["error"]
        assert live.summaries() == [as_summary(processed)] * 2


def test_with_a_token_a_purge_needs_it(live):
    assert call(live.client(), "POST", "/payments", payment(str(uuid.uuid4())))[0] == 202
    processed = live.wait_until_processed(1)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
        status, body = call(live.client(), "POST", "/purge-payments", headers=headers)
        assert status == 403 and "Authorization: Bearer" in body["error"]
    assert live.summaries() == [as_summary(processed)] * 2
    assert call(live.client(), "POST", "/purge-payments", headers=live.admin_headers)[0] == 200
    assert live.summaries() == [ZERO, ZERO]
