"""Decoding requests: any bytes either decode to a valid request or are rejected cleanly."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sign_in_tokens_client.contract.errors import InvalidRequestError
from sign_in_tokens_client.contract.messages import (
    JSON,
    MSGPACK,
    CreateSignInTokenRequestBody,
    UndecodableError,
    decode_request,
    encode_clerk_body,
    media_type,
    reply_content_type,
)

# On a fresh checkout hypothesis builds its Unicode table (about 2 s) during the first draw;
# that one-time cost is not slow generation, so the too_slow health check is off here.
PROPERTY = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
LIMITS = {"max_expires_in_seconds": 2_592_000, "max_body_bytes": 65_536}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)
fields = st.sampled_from(["user_id", "expires_in_seconds", "org_id", "userId", "expiresInSeconds", "orgId", "x"])
request_like = st.dictionaries(
    fields, json_values | st.text(min_size=1, max_size=300) | st.integers(min_value=-5, max_value=3_000_000), max_size=4
)


def assert_valid(request: CreateSignInTokenRequestBody) -> None:
    """A decoded request meets every rule of the contract."""
    assert 1 <= len(request.user_id) <= 256
    expires = request.expires_in_seconds
    assert expires is None or (type(expires) is int and 1 <= expires <= LIMITS["max_expires_in_seconds"])
    assert request.org_id is None or isinstance(request.org_id, str)


@PROPERTY
@given(st.binary(max_size=512), st.sampled_from([None, JSON, MSGPACK]))
def test_arbitrary_bytes_decode_or_are_rejected_with_our_errors(body: bytes, content_type: str | None) -> None:
    """Random bytes never raise anything but UndecodableError or InvalidRequestError."""
    with contextlib.suppress(UndecodableError, InvalidRequestError):
        assert_valid(decode_request(body, content_type, **LIMITS))


@PROPERTY
@given(request_like, st.sampled_from([JSON, MSGPACK]))
def test_request_shaped_objects_decode_or_are_invalid_never_undecodable(
    obj: dict[str, object], content_type: str
) -> None:
    """An object is always answerable: valid, or InvalidRequestError with a message."""
    encode = msgspec.msgpack.encode if content_type == MSGPACK else msgspec.json.encode
    try:
        request = decode_request(encode(obj), content_type, **LIMITS)
    except InvalidRequestError as exc:
        message = str(exc)
        assert message
    else:
        assert_valid(request)


def test_deep_nesting_is_rejected_not_crashing() -> None:
    """Thousands of nested arrays are undecodable, not a RecursionError."""
    with pytest.raises(UndecodableError):
        decode_request(b"[" * 20_000 + b"]" * 20_000, JSON, max_expires_in_seconds=10, max_body_bytes=10**6)


def test_oversized_body_is_rejected_before_parsing() -> None:
    """A body over MAX_BODY_BYTES is refused without being decoded."""
    with pytest.raises(UndecodableError, match="exceeds the limit"):
        decode_request(b'{"user_id": "' + b"u" * 100 + b'"}', JSON, max_expires_in_seconds=10, max_body_bytes=50)


def test_clerk_body_omits_absent_fields() -> None:
    """Only the fields given are sent to Clerk, so Clerk applies its defaults."""
    assert encode_clerk_body(CreateSignInTokenRequestBody(user_id="user_1")) == b'{"user_id":"user_1"}'


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        (None, JSON),
        ("", JSON),
        ("application/json; charset=utf-8", JSON),
        ("Application/JSON", JSON),
        ('APPLICATION/json ; Charset="UTF-8"', JSON),
        ("application/json;foo=bar", JSON),
        ("application/msgpack; charset=utf-8", MSGPACK),
        ("Application/X-MsgPack", MSGPACK),
        ("text/plain; charset=utf-8", None),
        ("application/jsonx", None),
    ],
)
def test_media_types_are_case_insensitive_and_may_carry_parameters(content_type: str | None, kind: str | None) -> None:
    """Type and subtype in any case, parameters allowed: what HTTP-minded clients send."""
    assert media_type(content_type) == kind
    if kind is not None:
        body = msgspec.msgpack.encode({"user_id": "u"}) if kind == MSGPACK else b'{"user_id": "u"}'
        assert decode_request(body, content_type, max_expires_in_seconds=60, max_body_bytes=1000).user_id == "u"
        assert reply_content_type(content_type) == kind


@pytest.mark.parametrize("charset", ["latin-1", "utf-16", "utf8", '"ascii"'])
def test_a_charset_other_than_utf8_is_invalid_request(charset: str) -> None:
    """Only UTF-8 text is read: another charset is refused by name, not decoded wrongly."""
    with pytest.raises(InvalidRequestError, match=r"charset .* is not supported; send UTF-8"):
        decode_request(
            b'{"user_id": "u"}', f"application/json; charset={charset}", max_expires_in_seconds=60, max_body_bytes=99
        )
