"""The idempotency store in Redis, shared by replicas: one call per message_id, leases that expire."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio
from aio_pika.abc import AbstractChannel
from pamqp import commands as spec

from service.client import SignInTokenClient
from service.dedup import Remembered, idempotency_key
from service.dedup._redis import RedisIdempotencyStore
from service.errors import DeadlineExceededError
from service.fake_clerk import FakeClerk
from service.local_broker import free_port
from service.messages import Created, SignInToken
from tests.conftest import WorkerFactory, wait_until
from tests.workers import Replies, WorkerProcesses, publish_requests

REQUEST = b'{"user_id":"user_a"}'
TOKEN = SignInToken(
    object="sign_in_token",
    id="sit_1",
    user_id="user_a",
    token="secret",
    status="pending",
    url="https://example.test/t",
    created_at=1,
    updated_at=1,
)
ANSWER = Created(sign_in_token=TOKEN)


def store(redis_url: str, window: float = 60.0, lease: float = 5.0) -> RedisIdempotencyStore:
    """One replica's store."""
    return RedisIdempotencyStore(redis_url, window, key_id="k", lease_seconds=lease)


async def test_two_replicas_claiming_one_key_make_one_call(redis_url: str) -> None:
    """The second replica's claim waits for the first's answer and gets it, instead of calling Clerk."""
    first, second = store(redis_url), store(redis_url)
    key = idempotency_key("alice", "m1")
    seen: list[Remembered | None] = []

    async def other_replica() -> None:
        async with second.claim(key) as remembered:
            seen.append(remembered)

    async with first.claim(key) as remembered:
        assert remembered is None
        waiting = asyncio.create_task(other_replica())
        await asyncio.sleep(0.1)  # wait-ok: give the other claim time to (wrongly) get through
        assert not waiting.done()
        await first.remember(key, REQUEST, ANSWER)
    await asyncio.wait_for(waiting, 5)
    assert seen == [Remembered(REQUEST, ANSWER)]
    for replica in (first, second):
        await replica.close()


async def test_a_lease_is_renewed_while_held_and_expires_when_its_replica_dies(redis_url: str) -> None:
    """A claim held for three leases keeps its key; a replica that vanishes frees it after one lease."""
    first, second = store(redis_url, lease=0.4), store(redis_url, lease=0.4)
    key = idempotency_key("alice", "m1")
    async with first.claim(key):
        with pytest.raises(DeadlineExceededError):
            async with second.claim(key, deadline=time.time() + 1.2):
                pytest.fail("the key was claimed twice")
    # Dies holding a lease: taken, never renewed nor released.
    await first.close()
    third = store(redis_url, lease=0.4)
    orphan = third.redis_key(key)
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.set(orphan, b"Lsome-dead-replica", px=400)
    started = time.monotonic()
    async with second.claim(key) as remembered:
        assert remembered is None
    assert 0.2 <= time.monotonic() - started <= 2.0
    await client.aclose()
    for replica in (second, third):
        await replica.close()


async def test_answers_are_scoped_by_publisher_and_expire_with_the_window(redis_url: str) -> None:
    """Another publisher's same message_id is another key; an answer lives for the window only."""
    replica = store(redis_url, window=0.5)
    key = idempotency_key("alice", "m1")
    async with replica.claim(key):
        await replica.remember(key, REQUEST, ANSWER)
    async with replica.claim(idempotency_key("bob", "m1")) as other:
        assert other is None
    async with replica.claim(key) as remembered:
        assert remembered == Remembered(REQUEST, ANSWER)
    await asyncio.sleep(0.6)  # wait-ok: the window's length is what is tested
    async with replica.claim(key) as expired:
        assert expired is None
    await replica.close()


async def test_an_unanswered_claim_is_released_for_the_next(redis_url: str) -> None:
    """A retryable failure remembers nothing: the next claim of the key gets it at once."""
    replica = store(redis_url)
    key = idempotency_key("alice", "m1")
    async with replica.claim(key):
        pass
    started = time.monotonic()
    async with replica.claim(key) as remembered:
        assert remembered is None
    assert time.monotonic() - started < 0.5
    await replica.close()


async def test_without_redis_a_claim_waits_to_its_deadline_and_readiness_says_so() -> None:
    """Redis unreachable: no claim, so no call to Clerk; the request gets deadline_exceeded."""
    replica = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0", 60, key_id="k")
    with pytest.raises(DeadlineExceededError):
        async with replica.claim(idempotency_key("alice", "m1"), deadline=time.time() + 1.0):
            pytest.fail("claimed without Redis")
    assert not replica.available
    await replica.close()


async def test_two_in_process_replicas_answer_copies_of_one_request_with_one_token(
    start_worker: WorkerFactory, client: SignInTokenClient, fake_clerk: FakeClerk, redis_url: str
) -> None:
    """Ten copies of one message_id spread over two workers: one call to Clerk, one token in every reply."""
    fake_clerk.latency_seconds = 0.2
    workers = [await start_worker(redis_url=redis_url, prefetch=5) for _ in range(2)]
    futures = [await client.send(REQUEST, message_id="burst") for _ in range(10)]
    bodies = {(await f).body for f in futures}
    assert len(bodies) == 1
    assert fake_clerk.stats.create_calls == 1
    assert all(sum(m._value.get() for m in w.metrics.requests._metrics.values()) > 0 for w in workers)


async def test_two_worker_processes_give_each_message_id_one_token(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    redis_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
) -> None:
    """Each of 200 message ids published twice, two replicas: 200 calls, and both replies carry the same token."""
    fake_clerk.latency_seconds = 0.02
    for _ in range(2):
        await worker_processes.start(REDIS_URL=redis_url, PREFETCH="20")
    await asyncio.gather(
        *(publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 200) for _ in range(2))
    )
    await wait_until(lambda: sum(replies.per_request.values()) == 400, timeout=60, what="both copies answered")
    assert fake_clerk.stats.create_calls == 200
    assert replies.tokens_per_request() == {1}
    answering = [w for w in worker_processes.started if '"replied"' in w.log_path.read_text()]
    assert len(answering) == 2, "one replica answered everything: the test proves little"


async def test_a_message_id_that_is_not_utf8_is_a_key_like_any_other(
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    redis_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
) -> None:
    """A message_id of raw bytes RabbitMQ passes through, sent twice: one call, the same token twice."""
    await start_worker(redis_url=redis_url)
    underlay = await channel.get_underlay_channel()
    for copy in range(2):
        properties = spec.Basic.Properties(
            message_id="id-\udcff\udcfe", correlation_id=f"odd-{copy}", reply_to=replies.queue
        )
        await underlay.basic_publish(REQUEST, routing_key=queue_names["REQUEST_QUEUE"], properties=properties)
    await wait_until(lambda: replies.answered == 2, what="both copies answered")
    assert fake_clerk.stats.create_calls == 1
    assert len(set().union(*replies.tokens.values())) == 1
