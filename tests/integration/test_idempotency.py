"""message_id as the idempotency key, scoped to the publisher: each test with the in-process store and with Redis's."""

from __future__ import annotations

from typing import Any

import aio_pika
import msgspec
import pytest
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created, Failed

from service.config import Settings
from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import SettingsFactory, WorkerFactory, get_message


@pytest.fixture(params=["memory", "redis"])
def make_settings(make_settings: SettingsFactory, request: pytest.FixtureRequest) -> SettingsFactory:
    """The test's settings, with REDIS_URL for the Redis store."""
    if request.param == "memory":
        return make_settings
    redis_url = request.getfixturevalue("redis_url")

    def make(**overrides: Any) -> Settings:
        return make_settings(**{"redis_url": redis_url, **overrides})

    return make


async def test_same_message_id_gets_the_same_token_from_one_call(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """A repeated message_id is answered with the first token; Clerk is called once."""
    first = (await (await client.send(b'{"user_id": "user_a"}', message_id="same"))).decode()
    second = (await (await client.send(b'{"user_id": "user_a"}', message_id="same"))).decode()
    assert isinstance(first, Created)
    assert first == second
    assert fake_clerk.stats.create_calls == 1
    assert worker.metrics.dedup_hits._value.get() == 1


async def test_concurrent_duplicates_make_one_call(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """Ten copies of one request in flight together: one upstream call, ten identical replies."""
    fake_clerk.latency_seconds = 0.05
    futures = [await client.send(b'{"user_id": "user_a"}', message_id="burst") for _ in range(10)]
    replies = {(await f).body for f in futures}
    assert len(replies) == 1
    assert fake_clerk.stats.create_calls == 1


async def test_final_failures_are_remembered(worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk) -> None:
    """`user_not_found` is final: the same key gets it again without a second call."""
    for _ in range(2):
        reply = (await (await client.send(b'{"user_id": "nobody"}', message_id="nf"))).decode()
        assert isinstance(reply, Failed)
        assert reply.error.code == "user_not_found"
    assert fake_clerk.stats.create_calls == 1


async def test_retryable_failures_are_not_remembered(
    start_worker: WorkerFactory, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """After `upstream_unavailable`, a retry with the same key makes a fresh attempt."""
    await start_worker(max_attempts=1)
    fake_clerk.fail_next(503)
    first = (await (await client.send(b'{"user_id": "user_a"}', message_id="again"))).decode()
    second = (await (await client.send(b'{"user_id": "user_a"}', message_id="again"))).decode()
    assert isinstance(first, Failed)
    assert isinstance(second, Created)
    assert fake_clerk.stats.create_calls == 2


async def test_key_is_scoped_to_the_publisher(
    worker: Worker,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """The same message_id from another publisher (user_id) is a different request."""
    replies = await channel.declare_queue(exclusive=True)
    for user_id in (None, "guest"):
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"user_id": "user_a"}', message_id="shared", user_id=user_id, reply_to=replies.name),
            queue_names["REQUEST_QUEUE"],
        )
    bodies = [msgspec.json.decode((await get_message(channel, replies.name)).body) for _ in range(2)]
    tokens = {b["sign_in_token"]["id"] for b in bodies}
    assert len(tokens) == 2
    assert fake_clerk.stats.create_calls == 2


async def test_a_reused_message_id_for_another_request_is_refused_not_answered_with_another_token(
    worker: Worker, channel: AbstractChannel, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """Two callers without a user_id property both use message_id 42: the second never gets the first's token."""
    replies = await channel.declare_queue(exclusive=True)
    for user in ("user_alice", "user_bob"):
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"user_id": "%s"}' % user.encode(), message_id="42", reply_to=replies.name),
            queue_names["REQUEST_QUEUE"],
        )
    answers = [msgspec.json.decode((await get_message(channel, replies.name)).body) for _ in range(2)]
    # The two replies may come in either order: the second request's answer needs only the first's stored one.
    first, second = sorted(answers, key=lambda a: a["outcome"] != "created")
    assert first["sign_in_token"]["user_id"] == "user_alice"
    assert second["outcome"] == "failed"
    assert second["error"]["code"] == "invalid_request"
    assert "message_id was already used for a different request" in second["error"]["message"]
    assert fake_clerk.stats.create_calls == 1


async def test_a_replayed_key_with_another_expiry_or_organization_is_refused(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """The same user with another expires_in_seconds or org_id is another request."""
    first = (await (await client.send(b'{"user_id": "user_a"}', message_id="k"))).decode()
    longer = (await (await client.send(b'{"user_id": "user_a", "expires_in_seconds": 60}', message_id="k"))).decode()
    org = (await (await client.send(b'{"user_id": "user_a", "org_id": "org_1"}', message_id="k"))).decode()
    camel = (await (await client.send(b'{"userId": "user_a"}', message_id="k"))).decode()
    assert isinstance(first, Created)
    assert isinstance(longer, Failed)
    assert isinstance(org, Failed)
    assert (longer.error.code, org.error.code) == ("invalid_request", "invalid_request")
    assert camel == first  # the other spelling of the same request
    assert fake_clerk.stats.create_calls == 1


async def test_a_duplicate_with_a_missing_reply_queue_does_not_revoke_the_delivered_token(
    worker: Worker,
    client: SignInTokenClient,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """The token came from the store: the first caller holds it, so a replay to `no-such-queue` is only dead-lettered."""
    first = (await (await client.send(b'{"user_id": "user_a"}', message_id="42"))).decode()
    assert isinstance(first, Created)
    # The same publisher (the client sends its connection's user, guest, as user_id), the same message_id.
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_a"}', message_id="42", reply_to="no-such-queue", user_id="guest"),
        queue_names["REQUEST_QUEUE"],
    )
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "reply_refused"
    assert fake_clerk.stats.revoked == set()
    assert fake_clerk.stats.tokens[first.sign_in_token.id]["status"] == "pending"
    again = (await (await client.send(b'{"user_id": "user_a"}', message_id="42"))).decode()
    assert again == first
