"""Impersonation's pure logic: its body decoded strictly, its rules in the policy, its replies on the wire."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest
from sign_in_tokens_client.contract.errors import ConfigError, ForbiddenError, InvalidRequestError
from sign_in_tokens_client.contract.messages import (
    ActorToken,
    CreateActorTokenRequestBody,
    Created,
    Revoked,
    SignInToken,
    UndecodableError,
    created,
    decode_actor_request,
    decode_reply,
    decode_revoke,
    encode_reply,
)

from service.trust.policy import Policy, load_policy
from tests.unit.test_policy_file import write

POLICY = """
protected_users = ["user_admin_*"]

[defaults]
lanes = ["interactive"]
max_expires_in_seconds = 600
reply_to = ["amq.rabbitmq.reply-to"]

[callers.support-portal]
lanes = ["impersonate"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
actor_keys = ["email"]
max_impersonation_seconds = 120
max_session_seconds = 900

[callers.helpdesk]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to"]
impersonate = ["*"]
actors = ["*"]
"""


def decode(body: bytes, content_type: str | None = None) -> CreateActorTokenRequestBody:
    return decode_actor_request(body, content_type, max_body_bytes=4096)


def test_either_spelling_and_messagepack_decode_to_clerks_body() -> None:
    snake = decode(
        b'{"user_id": "user_1", "actor": {"sub": "user_agent_1"}, "expires_in_seconds": 60,'
        b' "session_max_duration_in_seconds": 300}'
    )
    camel = decode(
        b'{"userId": "user_1", "actor": {"sub": "user_agent_1"}, "expiresInSeconds": 60,'
        b' "sessionMaxDurationInSeconds": 300}'
    )
    packed = decode(
        msgspec.msgpack.encode(
            {
                "user_id": "user_1",
                "actor": {"sub": "user_agent_1"},
                "expires_in_seconds": 60,
                "session_max_duration_in_seconds": 300,
            }
        ),
        "application/msgpack",
    )
    assert snake == camel == packed
    assert (snake.user_id, snake.actor_sub, snake.expires_in_seconds, snake.session_max_duration_in_seconds) == (
        "user_1",
        "user_agent_1",
        60,
        300,
    )
    # Absent lifetimes are not sent as null: the policy fills them in.
    assert msgspec.json.encode(decode(b'{"user_id": "u", "actor": {"sub": "a"}}')) == (
        b'{"user_id":"u","actor":{"sub":"a"}}'
    )


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"user_id": "user_1"}', "`actor`"),
        (b'{"actor": {"sub": "user_agent_1"}}', "`user_id`"),
        (b'{"user_id": "user_1", "actor": {}}', "$.actor"),
        (b'{"user_id": "user_1", "actor": {"email": "a@example.com"}}', "`sub`"),
        (b'{"user_id": "user_1", "actor": {"sub": 7}}', "$.actor"),
        (b'{"user_id": "user_1", "actor": "user_agent_1"}', "$.actor"),
        (b'{"user_id": "user_1", "actor": {"sub": "a", "iss": "https://x"}}', "$.actor.iss"),
        (b'{"user_id": "user_1", "actor": {"sub": "a", "sid": "sess_1"}}', "$.actor.sid"),
        (b'{"user_id": "user_1", "actor": {"sub": "a"}, "org_id": "org_1"}', "org_id"),
        (b'{"user_id": "user_1", "actor": {"sub": "a"}, "expires_in_seconds": 0}', "$.expires_in_seconds"),
        (b'{"user_id": "user_1", "actor": {"sub": "a"}, "expires_in_seconds": 1.5}', "$.expires_in_seconds"),
        (
            b'{"user_id": "user_1", "actor": {"sub": "a"}, "session_max_duration_in_seconds": true}',
            "$.session_max_duration_in_seconds",
        ),
        (b'{"userId": "user_1", "actor": {"sub": "a"}, "expires_in_seconds": 60}', "one spelling"),
        # The actor lands in the session's act claim and the audit trail: no control characters, no odd keys.
        (b'{"user_id": "user_1", "actor": {"sub": "user_agent_1\\nuser_boss"}}', "$.actor"),
        (b'{"user_id": "user_1", "actor": {"sub": "user_agent_1 user_boss"}}', "$.actor.sub"),
        (b'{"user_id": "user_1", "actor": {"sub": "a", "email": "a@x\\u0000"}}', "$.actor"),
        (b'{"user_id": "user_1", "actor": {"sub": "a", "e mail": "x"}}', "$.actor"),
    ],
)
def test_a_bad_body_is_invalid_request_naming_the_field(body: bytes, named: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        decode(body)
    assert named in raised.value.message


def test_a_body_that_is_no_object_is_undecodable() -> None:
    with pytest.raises(UndecodableError):
        decode(b"[1, 2]")


def test_a_revocation_names_one_token_of_either_kind() -> None:
    assert decode_revoke(b'{"actor_token_id": "act_1"}', None, max_body_bytes=4096) == ("actor_token", "act_1")
    assert decode_revoke(b'{"actorTokenId": "act_1"}', None, max_body_bytes=4096) == ("actor_token", "act_1")
    assert decode_revoke(b'{"sign_in_token_id": "sit_1"}', None, max_body_bytes=4096) == ("sign_in_token", "sit_1")
    for body, named in (
        (b'{"sign_in_token_id": "sit_1", "actor_token_id": "act_1"}', "not both"),
        (b'{"actorTokenId": "act_1", "sign_in_token_id": "sit_1"}', "one spelling"),
        (b"{}", "`sign_in_token_id`"),
        # Not a Clerk id: an actor token's grant can never be named through the other kind's field.
        (b'{"sign_in_token_id": "actor_token:act_1"}', "$.sign_in_token_id"),
        (b'{"actor_token_id": "act 1"}', "$.actor_token_id"),
    ):
        with pytest.raises(InvalidRequestError) as raised:
            decode_revoke(body, None, max_body_bytes=4096)
        assert named in raised.value.message


def _actor_token() -> ActorToken:
    return ActorToken(
        object="actor_token",
        id="act_1",
        status="pending",
        user_id="user_1",
        actor={"sub": "user_agent_1"},
        token="t",
        url="https://accounts.example/v1/tickets/accept?ticket=t",
        created_at=1,
        updated_at=1,
    )


def test_replies_carry_one_token_and_say_which_kind() -> None:
    reply = created(_actor_token())
    body = encode_reply(reply, "application/json")
    assert body.startswith(b'{"outcome":"created","actor_token":{')
    assert b"sign_in_token" not in body
    read = decode_reply(body, "application/json")
    assert isinstance(read, Created)
    assert (read.kind, read.token_object) == ("actor_token", _actor_token())
    # A sign-in token's reply is what it always was.
    token = SignInToken(
        object="sign_in_token", id="sit_1", status="pending", user_id="u", token="t", created_at=1, updated_at=1
    )
    assert encode_reply(created(token), "application/json").startswith(b'{"outcome":"created","sign_in_token":{')
    # Neither token, or both: not a reply the service writes.
    for bad in (b'{"outcome": "created"}', b'{"outcome": "revoked", "sign_in_token": %s, "actor_token": %s}'):
        with pytest.raises(msgspec.ValidationError, match="exactly one"):
            decode_reply(
                bad.replace(b"%s", msgspec.json.encode(_actor_token()), 2) if b"%s" in bad else bad,
                "application/json",
            )
    assert isinstance(
        decode_reply(encode_reply(Revoked(actor_token=_actor_token()), "application/msgpack"), "application/msgpack"),
        Revoked,
    )


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return Policy(load_policy(write(tmp_path, POLICY)))


def ask(user_id: str = "user_1", sub: str = "user_agent_1", **fields: object) -> CreateActorTokenRequestBody:
    return CreateActorTokenRequestBody(user_id=user_id, actor={"sub": sub, **fields.pop("actor", {})}, **fields)  # type: ignore[arg-type]


def refusal(policy: Policy, caller: str | None, request: CreateActorTokenRequestBody) -> str:
    with pytest.raises(ForbiddenError) as raised:
        policy.admit_actor(caller, request)
    return raised.value.message


def test_a_request_without_lifetimes_gets_the_callers_maxima(policy: Policy) -> None:
    admitted = policy.admit_actor("support-portal", ask(actor={"email": "agent@example.com"}))
    assert (admitted.expires_in_seconds, admitted.session_max_duration_in_seconds) == (120, 900)
    assert admitted.actor == {"sub": "user_agent_1", "email": "agent@example.com"}
    # A caller that says nothing of lifetimes gets the contract's defaults: 600 and 1,800 seconds.
    helpdesk = policy.admit_actor("helpdesk", ask("customer_9", "anyone"))
    assert (helpdesk.expires_in_seconds, helpdesk.session_max_duration_in_seconds) == (600, 1800)
    asked = policy.admit_actor("support-portal", ask(expires_in_seconds=30, session_max_duration_in_seconds=60))
    assert (asked.expires_in_seconds, asked.session_max_duration_in_seconds) == (30, 60)


def test_each_refusal_names_its_rule(policy: Policy) -> None:
    portal = "caller 'support-portal'"
    assert refusal(policy, "billing", ask()) == "impersonate: [defaults] may not impersonate user 'user_1'"
    assert refusal(policy, "support-portal", ask("customer_1")) == (
        f"impersonate: {portal} may not impersonate user 'customer_1'"
    )
    assert refusal(policy, "support-portal", ask(sub="user_boss")) == f"actors: {portal} may not name actor 'user_boss'"
    assert refusal(policy, "support-portal", ask(actor={"role": "admin"})) == (
        f"actor_keys: {portal} may not set the actor's 'role'"
    )
    assert refusal(policy, "support-portal", ask(expires_in_seconds=121)) == (
        f"max_impersonation_seconds: {portal} may ask for at most 120 seconds, not 121"
    )
    assert refusal(policy, "support-portal", ask(session_max_duration_in_seconds=901)) == (
        f"max_session_seconds: {portal} may ask for at most 900 seconds, not 901"
    )
    for caller in ("support-portal", "helpdesk"):
        assert (
            refusal(policy, caller, ask("user_admin_1"))
            == "protected_users: no caller may impersonate user 'user_admin_1'"
        )
    assert refusal(policy, None, ask()).startswith("callers: a request without a user_id property has no rules")


def test_an_impersonation_only_caller_gets_no_sign_in_token(policy: Policy) -> None:
    """``lanes = ["impersonate"]``: actor tokens, and no lane of sign-in tokens."""
    from sign_in_tokens_client.contract.lanes import Lane  # noqa: PLC0415
    from sign_in_tokens_client.contract.messages import CreateSignInTokenRequestBody  # noqa: PLC0415

    with pytest.raises(ForbiddenError, match="may not use the interactive lane"):
        policy.admit("support-portal", Lane.INTERACTIVE, CreateSignInTokenRequestBody(user_id="user_1"))


def test_a_cut_off_caller_impersonates_no_one(tmp_path: Path) -> None:
    policy = Policy(load_policy(write(tmp_path, POLICY.replace('lanes = ["impersonate"]', "lanes = []"))))
    assert refusal(policy, "support-portal", ask()) == "lanes: caller 'support-portal' may use no lane"


def test_without_a_policy_file_no_one_impersonates() -> None:
    assert refusal(Policy(None), "guest", ask()).startswith("impersonate: impersonation needs a POLICY_FILE")
    # ALLOWED_PUBLISHERS' callers may ask for anything but this.
    short = Policy.from_publishers(frozenset({"guest"}), 600)
    assert refusal(short, "guest", ask()) == "impersonate: caller 'guest' may not impersonate user 'user_1'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            POLICY + '\n[anonymous]\nlanes = ["interactive"]\nmax_expires_in_seconds = 60\nreply_to = ["x"]\n'
            'impersonate = ["user_*"]\n',
            "at anonymous.impersonate: a caller without a name may never impersonate",
        ),
        (
            POLICY.replace('actor_keys = ["email"]', 'actor_keys = ["iss"]'),
            "at callers.support-portal.actor_keys: 'iss'",
        ),
        (
            POLICY.replace('actor_keys = ["email"]', 'actor_keys = ["sub"]'),
            "at callers.support-portal.actor_keys: 'sub'",
        ),
        (
            POLICY.replace("max_session_seconds = 900", "max_session_seconds = 0"),
            "at callers.support-portal.max_session_seconds: Expected `int` >= 1",
        ),
        (POLICY.replace('actors = ["user_agent_*"]', 'actors = "user_agent_*"'), "at callers.support-portal.actors"),
        (
            POLICY
            + '\n[anonymous]\nlanes = ["interactive"]\nmax_expires_in_seconds = 60\nreply_to = ["x"]\nimpersonate = []\n',
            "at anonymous.impersonate: a caller without a name may never impersonate",
        ),
        (
            POLICY
            + '\n[anonymous]\nlanes = ["interactive"]\nmax_expires_in_seconds = 60\nreply_to = ["x"]\nactor_keys = ["iss"]\n',
            "at anonymous.actor_keys: a caller without a name may never impersonate",
        ),
    ],
)
def test_a_bad_impersonation_rule_is_one_line_naming_the_place(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, textwrap.dedent(text))
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_client_takes_an_actor_token_only_for_the_user_and_the_actor_it_asked_for() -> None:
    """A reply naming another impersonator (a forged or misrouted one) is not the call's."""
    from sign_in_tokens_client.replies import for_user  # noqa: PLC0415

    accepts = for_user("user_1", "actor_token", "user_agent_1")
    assert accepts(created(_actor_token()))
    other = msgspec.structs.replace(_actor_token(), actor={"sub": "user_boss"})
    assert not accepts(created(other))
    assert not accepts(created(msgspec.structs.replace(_actor_token(), user_id="user_2")))
    token = SignInToken(
        object="sign_in_token", id="sit_1", status="pending", user_id="user_1", token="t", created_at=1, updated_at=1
    )
    assert not accepts(created(token))


def test_a_bulk_only_caller_impersonates_no_one(tmp_path: Path) -> None:
    """Impersonation is served at the interactive lane: a caller needs "interactive" or "impersonate"."""
    policy = Policy(load_policy(write(tmp_path, POLICY.replace('lanes = ["impersonate"]', 'lanes = ["bulk"]'))))
    assert refusal(policy, "support-portal", ask()) == (
        "lanes: caller 'support-portal' may not impersonate (its lanes have neither interactive nor impersonate)"
    )


def test_a_revoked_token_clerk_answers_without_its_secret_still_reads() -> None:
    """Clerk's spec makes ``token`` optional: a revocation's answer may leave it out."""
    body = b'{"object": "actor_token", "id": "act_1", "status": "revoked", "user_id": "u", "actor": {"sub": "a"}, "created_at": 1, "updated_at": 2}'
    token = msgspec.json.decode(body, type=ActorToken)
    assert (token.id, token.status, token.token) == ("act_1", "revoked", "")


def test_the_instance_header_is_text_of_a_bounded_length() -> None:
    """A byte array as some clients send text is read; a value too long is refused, not echoed."""
    from service.amqp.envelope import Envelope  # noqa: PLC0415

    def envelope(value: object) -> Envelope:
        return Envelope("q", True, None, None, None, None, None, raw_instance=value)  # noqa: FBT003

    assert envelope(bytearray(b"prod")).instance_named() == "prod"
    assert envelope(None).instance_named() is None
    for bad in ("", "x" * 256, 7, b"\xff"):
        with pytest.raises(InvalidRequestError) as raised:
            envelope(bad).instance_named()
        assert "x" * 100 not in raised.value.message
