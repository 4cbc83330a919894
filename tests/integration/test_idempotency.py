"""message_id as the idempotency key, scoped to the publisher."""

from __future__ import annotations

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel

from service.client import TokenClient
from service.fake_clerk import FakeClerk
from service.messages import Created, Failed
from service.worker import Worker
from tests.conftest import WorkerFactory, get_message


async def test_same_message_id_gets_the_same_token_from_one_call(
    worker: Worker, client: TokenClient, fake_clerk: FakeClerk
) -> None:
    """A repeated message_id is answered with the first token; Clerk is called once."""
    first = (await (await client.send(b'{"user_id": "user_a"}', message_id="same"))).decode()
    second = (await (await client.send(b'{"user_id": "user_a"}', message_id="same"))).decode()
    assert isinstance(first, Created)
    assert first == second
    assert fake_clerk.stats.create_calls == 1
    assert worker.metrics.dedup_hits._value.get() == 1


async def test_concurrent_duplicates_make_one_call(worker: Worker, client: TokenClient, fake_clerk: FakeClerk) -> None:
    """Ten copies of one request in flight together: one upstream call, ten identical replies."""
    fake_clerk.latency_seconds = 0.05
    futures = [await client.send(b'{"user_id": "user_a"}', message_id="burst") for _ in range(10)]
    replies = {(await f).body for f in futures}
    assert len(replies) == 1
    assert fake_clerk.stats.create_calls == 1


async def test_final_failures_are_remembered(worker: Worker, client: TokenClient, fake_clerk: FakeClerk) -> None:
    """`user_not_found` is final: the same key gets it again without a second call."""
    for _ in range(2):
        reply = (await (await client.send(b'{"user_id": "nobody"}', message_id="nf"))).decode()
        assert isinstance(reply, Failed)
        assert reply.error.code == "user_not_found"
    assert fake_clerk.stats.create_calls == 1


async def test_retryable_failures_are_not_remembered(
    start_worker: WorkerFactory, client: TokenClient, fake_clerk: FakeClerk
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
