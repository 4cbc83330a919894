"""Impersonation (contract v3): actor tokens on IMPERSONATION_QUEUE, against a real broker and the stand-in Clerk.

Callers are broker users (RabbitMQ checks a message's ``user_id``): the support portal may
impersonate customers as its agents, billing may not impersonate at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from sign_in_tokens_client.client import (
    ForbiddenError,
    SignInTokenClient,
    UpstreamRejectedError,
    UpstreamUnavailableError,
    UserNotFoundError,
)
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import Created, Failed, Reply, decode_reply

from service.local.fake_clerk import FakeClerk, Fault
from service.worker.lifecycle import Worker
from tests.conftest import SECRET_KEY, WorkerFactory, events, get_message, queue_depth, wait_until
from tests.integration.test_policy import edit
from tests.ledger import Ledger

POLICY = """
protected_users = ["user_admin_*"]

[defaults]
lanes = ["interactive"]
max_expires_in_seconds = 600
reply_to = ["amq.rabbitmq.reply-to", "{prefix}.*"]

[callers.support-portal]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to", "{prefix}.*"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
actor_keys = ["email"]
max_impersonation_seconds = 120
max_session_seconds = 900

[callers.outsider]
lanes = ["impersonate"]
max_expires_in_seconds = 60
reply_to = ["amq.rabbitmq.reply-to", "{prefix}.*"]
impersonate = ["*"]
actors = ["*"]
"""


def prefix_of(queue_names: dict[str, str]) -> str:
    return queue_names["REQUEST_QUEUE"].split(".")[0]


@pytest.fixture
def policy(tmp_path: Path, queue_names: dict[str, str]) -> str:
    """The policy file of this test's queues."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.replace("{prefix}", prefix_of(queue_names)), encoding="utf-8")
    return str(path)


@pytest.fixture
async def impersonating(
    start_worker: WorkerFactory, policy: str, audit_exchange: str, audit_queue: AbstractQueue
) -> Worker:
    """A worker under the policy, its events on the test's audit exchange."""
    del audit_queue  # declared (and bound) before the worker's first event
    return await start_worker(policy_file=policy, audit_exchange=audit_exchange)


@pytest.fixture
async def callers(
    caller_urls: dict[str, str], queue_names: dict[str, str]
) -> AsyncIterator[dict[str, SignInTokenClient]]:
    """A client as each broker user of the tests."""
    opened = {}
    for name, url in caller_urls.items():
        client = SignInTokenClient(
            url,
            request_queue=queue_names["REQUEST_QUEUE"],
            bulk_queue=queue_names["BULK_QUEUE"],
            impersonation_queue=queue_names["IMPERSONATION_QUEUE"],
            revoke_queue=queue_names["REVOKE_QUEUE"],
        )
        await client.connect()
        opened[name] = client
    yield opened
    for client in opened.values():
        await client.close()


async def publish(
    connections: dict[str, AbstractRobustConnection],
    queue_names: dict[str, str],
    body: bytes,
    *,
    caller: str = "support-portal",
    queue: str = "IMPERSONATION_QUEUE",
    reply_to: str = "r",
    **properties: Any,
) -> Reply:
    """Publish ``body`` as ``caller`` to ``queue`` and return its reply (from a queue of the test's)."""
    channel = await connections[caller].channel()
    replies = await channel.declare_queue(f"{prefix_of(queue_names)}.{reply_to}", exclusive=True)
    message = aio_pika.Message(body, reply_to=replies.name, user_id=caller, **properties)
    await channel.default_exchange.publish(message, queue_names[queue])
    got = await get_message(channel, replies.name)
    await channel.close()
    assert got.headers["x-outcome"] in {"created", "failed"}
    return decode_reply(got.body, got.content_type)


def claims(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def test_a_support_agent_logs_in_as_a_customer_and_the_session_names_the_agent(
    impersonating: Worker,
    callers: dict[str, SignInTokenClient],
    audit_queue: AbstractQueue,
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """The actor token, its actor in the JWT's act claim, the caller's maxima sent, the audit event, the metric."""
    portal = callers["support-portal"]
    token = await portal.impersonate("user_1", actor_sub="user_agent_7", actor={"email": "agent@example.com"})
    token_ledger.delivered(token.id, "support-portal")
    assert (token.object, token.user_id, token.status) == ("actor_token", "user_1", "pending")
    assert token.actor == {"sub": "user_agent_7", "email": "agent@example.com"}
    assert claims(token.token)["act"] == token.actor
    # Neither lifetime asked for: the caller's maxima, never Clerk's hour and half hour.
    assert fake_clerk.actors.last_params == {
        "user_id": "user_1",
        "actor": {"sub": "user_agent_7", "email": "agent@example.com"},
        "expires_in_seconds": 120,
        "session_max_duration_in_seconds": 900,
    }
    sign_in = await portal.create("user_2")
    token_ledger.delivered(sign_in.id, "support-portal")
    (key, event), (sign_in_key, sign_in_event) = await events(audit_queue, 2)
    assert (key, sign_in_key) == ("created.interactive", "created.interactive")
    assert {k: event[k] for k in ("kind", "caller", "user_id", "actor_sub", "actor", "actor_token_id")} == {
        "kind": "actor_token",
        "caller": "support-portal",
        "user_id": "user_1",
        "actor_sub": "user_agent_7",
        "actor": {"sub": "user_agent_7", "email": "agent@example.com"},
        "actor_token_id": token.id,
    }
    assert (event["sign_in_token_id"], event["expires_in_seconds"]) == (None, 120)
    assert (sign_in_event["kind"], sign_in_event["actor"], sign_in_event["actor_sub"]) == ("sign_in_token", None, None)
    assert (sign_in_event["sign_in_token_id"], sign_in_event["actor_token_id"]) == (sign_in.id, None)
    assert token.token not in json.dumps(event)
    assert 'sign_in_tokens_requests_total{instance="default",lane="impersonate",outcome="created"} 1.0' in (
        impersonating.metrics.render().decode()
    )
    await token_ledger.balanced()


async def test_either_spelling_json_or_messagepack(
    impersonating: Worker,
    connections: dict[str, AbstractRobustConnection],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """The TypeScript SDK's spelling, and MessagePack (answered in MessagePack)."""
    camel = await publish(
        connections,
        queue_names,
        b'{"userId": "user_1", "actor": {"sub": "user_agent_1"}, "expiresInSeconds": 60,'
        b' "sessionMaxDurationInSeconds": 300}',
    )
    assert isinstance(camel, Created)
    assert camel.kind == "actor_token"
    assert fake_clerk.actors.last_params is not None
    assert (
        fake_clerk.actors.last_params["expires_in_seconds"],
        fake_clerk.actors.last_params["session_max_duration_in_seconds"],
    ) == (60, 300)
    packed = await publish(
        connections,
        queue_names,
        msgspec.msgpack.encode({"user_id": "user_2", "actor": {"sub": "user_agent_1"}}),
        content_type="application/msgpack",
    )
    assert isinstance(packed, Created)
    assert (packed.kind, packed.token_object.user_id) == ("actor_token", "user_2")


async def test_each_bad_body_and_each_rule_is_refused_by_name_and_clerk_is_not_called(
    impersonating: Worker,
    callers: dict[str, SignInTokenClient],
    connections: dict[str, AbstractRobustConnection],
    queue_names: dict[str, str],
    audit_queue: AbstractQueue,
    fake_clerk: FakeClerk,
) -> None:
    """invalid_request naming the field; forbidden naming the rule; an impersonation-only caller gets no sign-in token."""
    for body, named in (
        (b'{"user_id": "user_1"}', "`actor`"),
        (b'{"user_id": "user_1", "actor": {"email": "a@example.com"}}', "`sub`"),
        (b'{"user_id": "user_1", "actor": {"sub": "user_agent_1", "iss": "x"}}', "$.actor.iss"),
        (b'{"user_id": "user_1", "actor": {"sub": "user_agent_1"}, "org_id": "org_1"}', "org_id"),
        (b'{"user_id": "user_1", "actor": {"sub": "user_agent_1"}, "expires_in_seconds": 0}', "expires_in_seconds"),
    ):
        reply = await publish(connections, queue_names, body)
        assert isinstance(reply, Failed)
        assert (reply.error.code, named in reply.error.message) == ("invalid_request", True), reply.error.message
    portal, billing = callers["support-portal"], callers["billing"]
    refusals = (
        (
            lambda: billing.impersonate("user_1", actor_sub="user_agent_1"),
            "impersonate: [defaults] may not impersonate",
        ),
        (lambda: portal.impersonate("customer_1", actor_sub="user_agent_1"), "may not impersonate user 'customer_1'"),
        (
            lambda: portal.impersonate("user_1", actor_sub="user_boss"),
            "actors: caller 'support-portal' may not name actor",
        ),
        (lambda: portal.impersonate("user_1", actor_sub="user_agent_1", actor={"role": "x"}), "actor_keys: "),
        (
            lambda: portal.impersonate("user_1", actor_sub="user_agent_1", expires_in_seconds=121),
            "max_impersonation_seconds",
        ),
        (
            lambda: portal.impersonate("user_1", actor_sub="user_agent_1", session_max_duration_in_seconds=901),
            "max_session_seconds: caller 'support-portal' may ask for at most 900 seconds, not 901",
        ),
        (
            lambda: portal.impersonate("user_admin_1", actor_sub="user_agent_1"),
            "protected_users: no caller may impersonate",
        ),
        (lambda: callers["outsider"].create("user_1"), "lanes: caller 'outsider' may not use the interactive lane"),
    )
    for call, message in refusals:
        with pytest.raises(ForbiddenError, match=re.escape(message)):
            await call()
    assert (fake_clerk.actors.create_calls, fake_clerk.stats.create_calls) == (0, 0)
    refused = await events(audit_queue, 5 + len(refusals))
    assert [key for key, _ in refused[5:]] == ["refused.interactive"] * len(refusals)
    assert {event["kind"] for _, event in refused[5:-1]} == {"actor_token"}


async def test_without_a_policy_file_impersonation_is_forbidden(
    start_worker: WorkerFactory, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    await start_worker()
    with pytest.raises(ForbiddenError, match="impersonation needs a POLICY_FILE"):
        await client.impersonate("user_1", actor_sub="user_agent_1")
    assert fake_clerk.actors.create_calls == 0


async def test_clerks_answers_a_spent_allowance_402_is_not_retried_others_as_for_creates(
    impersonating: Worker, callers: dict[str, SignInTokenClient], fake_clerk: FakeClerk, token_ledger: Ledger
) -> None:
    """402 upstream_rejected (once, remembered under its key); 404 user_not_found; a 503 and a 429 retried.

    And a malformed 200 (its token revoked), a rejected key (the request held until the key works).
    """
    outsider = callers["outsider"]
    fake_clerk.actors.impersonations_left = 0
    for _ in range(2):
        with pytest.raises(UpstreamRejectedError) as raised:
            await outsider.impersonate("user_1", actor_sub="agent_1", message_id="spent-1")
        error = raised.value
        assert (error.upstream_status, error.upstream_code, error.attempts) == (402, "payment_required", 1)
        assert error.message == "Payment required"  # Clerk's message, as for every rejection
    assert fake_clerk.actors.create_calls == 1  # not retried, and the second answered from the store
    fake_clerk.actors.impersonations_left = None
    with pytest.raises(UserNotFoundError):
        await outsider.impersonate("nobody_1", actor_sub="agent_1")
    fake_clerk.faults.extend([Fault(503), Fault(429, retry_after=0)])
    token = await outsider.impersonate("user_1", actor_sub="agent_1")
    token_ledger.delivered(token.id, "outsider")
    assert fake_clerk.actors.create_calls == 5
    # A 200 that is not an ActorToken: upstream_unavailable, and the token it names revoked at /actor_tokens.
    fake_clerk.malformed_next = 1
    with pytest.raises(UpstreamUnavailableError, match="with a body that is not an ActorToken"):
        await outsider.impersonate("user_2", actor_sub="agent_1")
    await wait_until(lambda: len(fake_clerk.actors.revoked) == 1, what="the malformed answer's token revoked")
    # A rejected key holds the impersonation, as it holds a create, until the key works again.
    fake_clerk.accepted_keys = {"sk_test_someone_elses"}
    held = asyncio.create_task(outsider.impersonate("user_3", actor_sub="agent_1", timeout=30))
    await wait_until(lambda: not impersonating.key_ok, what="the key rejected")
    fake_clerk.accepted_keys = {SECRET_KEY}
    held_token = await held
    token_ledger.delivered(held_token.id, "outsider")
    await token_ledger.balanced()


async def test_only_the_caller_given_an_actor_token_revokes_it(
    impersonating: Worker,
    callers: dict[str, SignInTokenClient],
    audit_queue: AbstractQueue,
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """Billing is refused, an id given as the other kind names nothing, the portal revokes it at /actor_tokens."""
    portal, billing = callers["support-portal"], callers["billing"]
    token = await portal.impersonate("user_1", actor_sub="user_agent_1")
    sign_in = await portal.create("user_2")
    with pytest.raises(ForbiddenError, match=r"actor token .* was not given to this caller"):
        await billing.revoke_actor_token(token.id)
    with pytest.raises(ForbiddenError, match=r"sign-in token .* was not given to this caller"):
        await portal.revoke(token.id)
    with pytest.raises(ForbiddenError, match=r"actor token .* was not given to this caller"):
        await portal.revoke_actor_token(sign_in.id)
    assert fake_clerk.actors.revoke_calls == 0
    fake_clerk.revoke_without_secret = True  # Clerk's spec lets its answer leave the token out
    revoked = await portal.revoke_actor_token(token.id)
    assert (revoked.id, revoked.status, revoked.actor, revoked.token) == (
        token.id,
        "revoked",
        {"sub": "user_agent_1"},
        "",
    )
    assert fake_clerk.actors.revoked == {token.id}
    token_ledger.delivered(sign_in.id, "support-portal")
    got = await events(audit_queue, 6)
    key, event = got[-1]
    assert key == "revoked.interactive"
    assert (event["kind"], event["actor_token_id"], event["caller"]) == ("actor_token", token.id, "support-portal")
    assert (event["actor_sub"], event["user_id"]) == ("user_agent_1", "user_1")
    await token_ledger.balanced()


async def test_a_late_actor_token_is_revoked(
    impersonating: Worker,
    connections: dict[str, AbstractRobustConnection],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """Clerk answers after x-deadline: deadline_exceeded, and the token made is revoked at /actor_tokens."""
    fake_clerk.answer_delay_seconds = 1.0
    reply = await publish(
        connections,
        queue_names,
        b'{"user_id": "user_1", "actor": {"sub": "user_agent_1"}}',
        headers={"x-deadline": int((time.time() + 0.5) * 1000)},
    )
    assert isinstance(reply, Failed)
    assert (reply.error.code, reply.error.upstream_status) == ("deadline_exceeded", 200)
    await wait_until(lambda: len(fake_clerk.actors.revoked) == 1, what="the late token revoked")
    assert set(fake_clerk.actors.tokens) == fake_clerk.actors.revoked
    await token_ledger.balanced()


async def test_an_undeliverable_actor_token_is_revoked_and_its_request_dead_lettered(
    impersonating: Worker,
    connections: dict[str, AbstractRobustConnection],
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """A reply_to the policy allows but no queue has: the token revoked, the request dead-lettered, no token in it."""
    publisher = await connections["support-portal"].channel()
    await publisher.default_exchange.publish(
        aio_pika.Message(
            b'{"user_id": "user_1", "actor": {"sub": "user_agent_1"}}',
            reply_to=f"{prefix_of(queue_names)}.nowhere",
            user_id="support-portal",
        ),
        queue_names["IMPERSONATION_QUEUE"],
    )
    await wait_until(lambda: len(fake_clerk.actors.revoked) == 1, what="the undeliverable token revoked")
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "reply_refused"
    token = next(iter(fake_clerk.actors.tokens.values()))
    assert token["token"] not in dead.body.decode() + json.dumps(dict(dead.headers), default=str)
    await token_ledger.balanced()


async def test_a_message_id_answers_one_kind_of_request_only(
    impersonating: Worker,
    connections: dict[str, AbstractRobustConnection],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """The same key on the other kind's queue is invalid_request; on its own queue, the same token again."""
    actor_body = b'{"user_id": "user_1", "actor": {"sub": "user_agent_1"}}'
    sign_in = await publish(connections, queue_names, b'{"user_id": "user_1"}', queue="REQUEST_QUEUE", message_id="k1")
    assert isinstance(sign_in, Created)
    reused = await publish(connections, queue_names, actor_body, message_id="k1")
    assert isinstance(reused, Failed)
    assert (reused.error.code, "already used for a different request" in reused.error.message) == (
        "invalid_request",
        True,
    )
    first = await publish(connections, queue_names, actor_body, message_id="k2")
    again = await publish(connections, queue_names, actor_body, message_id="k2")
    assert isinstance(first, Created)
    assert again == first
    other = await publish(connections, queue_names, b'{"user_id": "user_1"}', queue="REQUEST_QUEUE", message_id="k2")
    assert isinstance(other, Failed)
    assert other.error.code == "invalid_request"
    assert (fake_clerk.stats.create_calls, fake_clerk.actors.create_calls) == (1, 1)
    token_ledger.delivered(sign_in.token_object.id, "support-portal")
    token_ledger.delivered(first.token_object.id, "support-portal")
    await token_ledger.balanced()


async def test_both_kinds_share_the_fleets_rate_limit(
    start_worker: WorkerFactory,
    policy: str,
    redis_url: str,
    connections: dict[str, AbstractRobustConnection],
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """Two workers sharing Redis, 20 sign-in and 20 actor tokens at once: all made within one limit of 10 a second."""
    fake_clerk.rate_limit = 10
    fake_clerk.rate_window_seconds = 1.0
    for _ in range(2):
        await start_worker(policy_file=policy, redis_url=redis_url, clerk_rate_limit=10, clerk_rate_window_seconds=1)
    publisher = await connections["support-portal"].channel()
    replies = await channel.declare_queue(f"{prefix_of(queue_names)}.both", exclusive=True)
    started = time.monotonic()
    for n in range(20):
        for queue, body in (
            ("REQUEST_QUEUE", {"user_id": f"user_s{n}"}),
            ("IMPERSONATION_QUEUE", {"user_id": f"user_a{n}", "actor": {"sub": "user_agent_1"}}),
        ):
            message = aio_pika.Message(json.dumps(body).encode(), reply_to=replies.name, user_id="support-portal")
            await publisher.default_exchange.publish(message, queue_names[queue])
    got: list[Reply] = []
    while len(got) < 40:
        message = await get_message(channel, replies.name, timeout=30)
        got.append(decode_reply(message.body, message.content_type))
    elapsed = time.monotonic() - started
    kinds = sorted(reply.kind for reply in got if isinstance(reply, Created))
    assert kinds == ["actor_token"] * 20 + ["sign_in_token"] * 20
    for reply in got:
        assert isinstance(reply, Created)
        token_ledger.delivered(reply.token_object.id, "support-portal")
    assert fake_clerk.stats.rate_limited <= 1  # a call reaches Clerk a little after its slot (test_rate_limit)
    assert elapsed >= 3  # 40 calls at 10 a second, both kinds and both workers together
    assert await queue_depth(channel, queue_names["DEAD_LETTER_QUEUE"]) == 0
    await token_ledger.balanced()


async def test_a_copy_after_a_policy_reload_or_with_its_actor_keys_reordered_gets_the_same_token(
    impersonating: Worker,
    connections: dict[str, AbstractRobustConnection],
    queue_names: dict[str, str],
    policy: str,
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """The key's answer is kept with the request as asked: a narrower cap since, or another key order, is the same request."""
    first = await publish(
        connections,
        queue_names,
        b'{"user_id": "user_1", "actor": {"sub": "user_agent_1", "email": "a@x"}}',
        message_id="k",
    )
    assert isinstance(first, Created)
    sign_in = await publish(connections, queue_names, b'{"user_id": "user_2"}', queue="REQUEST_QUEUE", message_id="s")
    reordered = await publish(
        connections,
        queue_names,
        b'{"user_id": "user_1", "actor": {"email": "a@x", "sub": "user_agent_1"}}',
        message_id="k",
    )
    edit(policy, "max_impersonation_seconds = 120", "max_impersonation_seconds = 90")
    edit(policy, "max_expires_in_seconds = 300", "max_expires_in_seconds = 200")
    assert impersonating.reload_policy()
    reloaded = await publish(
        connections,
        queue_names,
        b'{"user_id": "user_1", "actor": {"sub": "user_agent_1", "email": "a@x"}}',
        message_id="k",
    )
    sign_in_again = await publish(
        connections, queue_names, b'{"user_id": "user_2"}', queue="REQUEST_QUEUE", message_id="s"
    )
    assert reordered == first
    assert reloaded == first
    assert sign_in_again == sign_in  # a sign-in token's copy too: its expiry was filled in under the old cap
    assert (fake_clerk.actors.create_calls, fake_clerk.stats.create_calls) == (1, 1)
    assert isinstance(sign_in, Created)
    token_ledger.delivered(first.token_object.id, "support-portal")
    token_ledger.delivered(sign_in.token_object.id, "support-portal")
    await token_ledger.balanced()


async def test_an_impersonation_jumps_a_bulk_backlog_as_the_interactive_lane_does(
    start_worker: WorkerFactory, client: SignInTokenClient, fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    """With 60 bulk requests queued, an impersonation is served at the interactive lane's priority."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[defaults]\nlanes = ["interactive", "bulk"]\nmax_expires_in_seconds = 600\nreply_to = ["*"]\n'
        'impersonate = ["user_*"]\nactors = ["user_agent_*"]\n'
    )
    fake_clerk.latency_seconds = 0.03
    await start_worker(upstream_concurrency=2, policy_file=str(policy))
    bulk = [await client.send(b'{"user_id": "user_b%d"}' % i, lane=Lane.BULK) for i in range(60)]
    await wait_until(lambda: fake_clerk.stats.create_calls >= 2, what="bulk work to start")
    started = time.monotonic()
    token = await client.impersonate("user_now", actor_sub="user_agent_1", timeout=10)
    answered_at = time.monotonic()
    assert token.user_id == "user_now"
    answered_before = sum(1 for f in bulk if f.done() and f.result().received_at < answered_at)
    assert answered_before < 20, f"{answered_before} bulk requests went first ({answered_at - started:.2f} s)"
    await asyncio.gather(*bulk)
