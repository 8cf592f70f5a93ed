import random
import uuid

import orjson
import pytest

from conftest import random_uuid
from paycore.core.correlation_id import uuid_to_bytes, uuid_to_text
from paycore.core.payment_parser import InvalidPayment, parse_payment
from paycore.core.processor_payload import encode_payment

ID = "8e86da15-a8f5-4acc-a120-91844594febe"
ID_BYTES = uuid.UUID(ID).bytes


def body(**fields) -> bytes:
    return orjson.dumps(fields)


@pytest.mark.parametrize("raw, cents", [
    (b'{"correlationId":"%s","amount":20.05}' % ID.encode(), 2005),
    (b' {\n "amount" : 19.9 ,\t"correlationId" : "%s" } ' % ID.encode(), 1990),
    (b'{"correlationId":"%s","amount":1,"note":[1,{"a":null},true,false,"\\u00e9\xc3\xa9"]}' % ID.encode(), 100),
    (b'{"correlationId":"%s","amount":1}' % ID.upper().encode(), 100),
    (b'{"corr\\u0065lationId":"%s","amount":1}' % ID.encode(), 100),
    (b'{"correlationId":"\\u0038%s","amount":1}' % ID[1:].encode(), 100),
])
def test_valid(raw, cents):
    assert parse_payment(raw) == (ID_BYTES, cents)


@pytest.mark.parametrize("raw, status, message", [
    (b"", 400, "not valid JSON"),
    (b"{", 400, "not valid JSON"),
    (b"not json", 400, "not valid JSON"),
    (b'{"correlationId":"%s","amount":1,}' % ID.encode(), 400, "not valid JSON"),
    (b'{"correlationId":"%s","amount":1} x' % ID.encode(), 400, "not valid JSON"),
    (b'{"correlationId":"%s","amount":01}' % ID.encode(), 400, "not valid JSON"),
    (b'{"correlationId":"%s","amount":NaN}' % ID.encode(), 400, "not valid JSON"),
    (b'{"correlationId":"%s","amount":1,"x":"\xff"}' % ID.encode(), 400, "not valid JSON"),
    (b'{"correlationId":"%s\x01","amount":1}' % ID.encode(), 400, "not valid JSON"),
    (b"[" * 40 + b"]" * 40, 400, "not valid JSON"),
    (b"[]", 422, "JSON object"),
    (b"null", 422, "JSON object"),
    (b"{}", 422, "correlationId is required"),
    (body(amount=1), 422, "correlationId is required"),
    (body(correlationId=ID), 422, "amount is required"),
    (body(correlationId="nope", amount=1), 422, "UUID"),
    (body(correlationId=123, amount=1), 422, "UUID"),
    (body(correlationId=ID.replace("-", ""), amount=1), 422, "UUID"),
    (body(correlationId=ID, amount="20.05"), 422, "must be a number"),
    (body(correlationId=ID, amount=None), 422, "must be a number"),
    (body(correlationId=ID, amount=0), 422, "positive"),
    (body(correlationId=ID, amount=-20.05), 422, "positive"),
    (b'{"correlationId":"%s","amount":20.055}' % ID.encode(), 422, "2 decimal places"),
    (b'{"correlationId":"%s","amount":1e400}' % ID.encode(), 422, "too large"),
    (b'{"correlationId":"%s","amount":1,"amount":2}' % ID.encode(), 422, "twice"),
])
def test_refused(raw, status, message):
    with pytest.raises(InvalidPayment, match=message) as refused:
        parse_payment(raw)
    assert refused.value.http_status == status


def test_json_syntax_verdict_agrees_with_orjson():
    """Random edits of valid bodies: a 400 exactly when orjson calls it invalid JSON."""
    rng = random.Random(11)
    seeds = [body(correlationId=ID, amount=20.05),
             b'{"amount":1.5e1,"correlationId":"%s","x":[true,false,null,{"k":"\\u00e9"}]}' % ID.encode()]
    alphabet = b'{}[]:,"\\ 0123456789.-+eEtrufalsn\xc3\xa9\x80ux'
    for _ in range(30000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw))
            choice = rng.random()
            if choice < 0.4:
                del raw[at]
            elif choice < 0.8:
                raw.insert(at, rng.choice(alphabet))
            else:
                raw[at] = rng.choice(alphabet)
        raw = bytes(raw)
        try:
            orjson.loads(raw)
            valid = True
        except orjson.JSONDecodeError:
            valid = False
        try:
            parse_payment(raw)
            ours = True
        except InvalidPayment as error:
            ours = error.http_status != 400
        assert ours == valid, raw


def test_correlation_id_round_trip():
    for _ in range(1000):
        value = random_uuid()
        assert uuid_to_bytes(str(value)) == value.bytes
        assert uuid_to_text(value.bytes) == str(value)


def test_processor_payload():
    payload = orjson.loads(encode_payment(ID_BYTES, 2005, 1755753365965))
    assert payload == {"correlationId": ID, "amount": 20.05, "requestedAt": "2025-08-21T05:16:05.965Z"}
    assert b'"amount":20.05,' in encode_payment(ID_BYTES, 2005, 0)
