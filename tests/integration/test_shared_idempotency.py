"""The idempotency store in Redis, shared by replicas: one call per message_id, leases that expire."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nacl.utils
import pytest
import redis.asyncio
from aio_pika.abc import AbstractChannel
from pamqp import commands as spec
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.errors import DeadlineExceededError
from sign_in_tokens_client.contract.messages import Created, SignInToken

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import free_port
from service.state.dedup import ClaimLostError, Found, Remembered, idempotency_key
from service.state.dedup._redis import RedisIdempotencyStore
from service.state.dedup.cipher import AnswerCipher, AnswerUnreadableError
from tests.conftest import WorkerFactory, wait_until
from tests.ledger import Ledger
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
    return RedisIdempotencyStore(redis_url, window, lease_seconds=lease)


def other_answer() -> Created:
    """An answer another replica stored: another token."""
    return Created(sign_in_token=msgspec.structs.replace(TOKEN, id="sit_2"))


async def test_two_replicas_claiming_one_key_make_one_call(redis_url: str) -> None:
    """The second replica's claim waits until the first's reply is delivered, then reads its answer."""
    first, second = store(redis_url), store(redis_url)
    key = idempotency_key("alice", "m1", "unused")
    seen: list[tuple[Found, Remembered | None]] = []

    async def other_replica() -> None:
        async with second.claim(key) as claim:
            seen.append((claim.found, claim.remembered))

    async with first.claim(key) as claim:
        assert claim.found is Found.NEW
        waiting = asyncio.create_task(other_replica())
        await claim.remember(REQUEST, ANSWER, 60)
        await asyncio.sleep(0.1)  # wait-ok: give the other claim time to (wrongly) get through
        assert not waiting.done(), "a copy read the answer before its reply's fate was known"
        await claim.delivered()
    await asyncio.wait_for(waiting, 5)
    assert seen == [(Found.ANSWERED, Remembered(REQUEST, ANSWER))]
    for replica in (first, second):
        await replica.close()


async def test_a_lease_is_renewed_while_held_and_ends_when_its_replica_stops_renewing(redis_url: str) -> None:
    """A claim held for three leases keeps its key; one whose replica stops renewing frees it after one lease."""
    first, second = store(redis_url, lease=0.4), store(redis_url, lease=0.4)
    key = idempotency_key("alice", "m1", "unused")
    async with first.claim(key):
        with pytest.raises(DeadlineExceededError):
            async with second.claim(key, deadline=time.time() + 1.2):
                pytest.fail("the key was claimed twice")
    third = store(redis_url, lease=0.4)
    async with third.claim(key):
        assert third._renewer is not None
        third._renewer.cancel()  # it stops renewing, as a replica that died would
        started = time.monotonic()
        async with second.claim(key) as claim:
            assert claim.found is Found.NEW
        assert 0.2 <= time.monotonic() - started <= 2.0
    for replica in (first, second, third):
        await replica.close()


async def test_a_claim_lost_while_paused_may_not_store_and_reads_only_a_delivered_answer(redis_url: str) -> None:
    """A replica that stops renewing past its lease comes back to a moved fence: ClaimLostError.

    It carries the other claim's answer only once that answer was delivered: an answer whose reply
    may yet be refused (and its token revoked) is never handed to a second caller.
    """
    paused, other = store(redis_url, lease=0.4), store(redis_url, lease=0.4)
    key = idempotency_key("alice", "m1", "unused")
    async with paused.claim(key) as stale:
        assert paused._renewer is not None
        paused._renewer.cancel()  # paused: no renewal reaches Redis
        async with other.claim(key) as claim:
            assert claim.found is Found.NEW
            for step in ("claimed", "remembered"):
                with pytest.raises(ClaimLostError) as lost_early:
                    await stale.remember(REQUEST, ANSWER, 60)
                assert lost_early.value.answer is None, step
                if step == "claimed":
                    await claim.remember(REQUEST, other_answer(), 60)
            await claim.delivered()
        with pytest.raises(ClaimLostError) as lost:
            await stale.remember(REQUEST, ANSWER, 60)
    assert lost.value.answer == Remembered(REQUEST, other_answer())
    async with other.claim(key) as claim:
        assert claim.remembered == Remembered(REQUEST, other_answer())
    for replica in (paused, other):
        await replica.close()


@pytest.mark.parametrize("the_other_answers", [True, False])
async def test_a_withdrawal_asked_again_after_a_lost_reply_still_says_withdrawn(
    redis_url: str, *, the_other_answers: bool
) -> None:
    """Withdraw runs, its reply is lost (a stall); a copy claims the key and answers or lets it go; asked again: withdrawn."""
    first, second = store(redis_url), store(redis_url)
    key = idempotency_key("alice", "m1", "unused")
    async with first.claim(key) as mine:
        await mine.remember(REQUEST, ANSWER, 60)
        assert mine.tag is not None
        status, _ = await first.run(first.withdraw_script, mine.keys, [mine.fence, mine.tag])  # its reply "lost"
        assert status == 1
        async with second.claim(key) as copy:
            assert copy.found is Found.NEW
            if the_other_answers:
                await copy.remember(REQUEST, other_answer(), 60)
                await copy.delivered()
        assert await mine.withdraw() is True
    for replica in (first, second):
        await replica.close()


@pytest.mark.parametrize("how", ["window", "flushed"])
async def test_a_withdrawal_of_an_answer_that_is_gone_says_withdrawn(redis_url: str, how: str) -> None:
    """The answer's key is gone (Redis emptied, or an unheld key past its window): nobody can have its token."""
    replica = store(redis_url, window=0.3, lease=0.3)
    key = idempotency_key("alice", "m1", "unused")
    client = redis.asyncio.Redis.from_url(redis_url)
    async with replica.claim(key) as mine:
        await mine.remember(REQUEST, ANSWER, 60)
        if how == "flushed":
            await client.flushall()
        else:
            replica.let_go(mine.keys[0])  # no longer renewed: the answer's key ends with its lease
            for _ in range(200):
                if not await client.exists(mine.keys[0]):
                    break
                await asyncio.sleep(0.05)  # wait-ok: the poll interval of a condition wait
            assert not await client.exists(mine.keys[0])
        assert await mine.withdraw() is True
    await client.aclose()
    await replica.close()


async def test_a_held_answer_outlives_its_window_until_its_fate_is_known(redis_url: str) -> None:
    """A claim still holding its answer keeps it past the window (renewed a lease at a time); delivered, it has the window."""
    replica = store(redis_url, window=0.2, lease=0.4)
    key = idempotency_key("alice", "m1", "unused")
    client = redis.asyncio.Redis.from_url(redis_url)
    async with replica.claim(key) as mine:
        await mine.remember(REQUEST, ANSWER, 60)
        await asyncio.sleep(0.6)  # wait-ok: longer than the window is what is tested
        assert await client.hexists(mine.keys[0], "answer")
        await mine.delivered()
    assert 0 < await client.pttl(replica.redis_key(key)) <= 200
    await client.aclose()
    await replica.close()


async def test_a_withdrawn_answer_leaves_the_key_to_the_next_copy_and_a_delivered_one_stays(redis_url: str) -> None:
    """Withdraw drops an undelivered answer (the waiting copy calls afresh); after delivery it drops nothing."""
    replica = store(redis_url)
    key = idempotency_key("alice", "m1", "unused")
    async with replica.claim(key) as claim:
        await claim.remember(REQUEST, ANSWER, 60)
        assert await claim.withdraw() is True
        assert await claim.withdraw() is True  # a withdrawal tried again gets the same answer
    async with replica.claim(key) as claim:
        assert (claim.found, claim.remembered) == (Found.NEW, None)
        await claim.remember(REQUEST, ANSWER, 60)
        await claim.delivered()
        assert await claim.withdraw() is False
    async with replica.claim(key) as claim:
        assert claim.found is Found.ANSWERED
    await replica.close()


async def test_an_answer_whose_fate_is_unknown_is_taken_over_by_the_next_copy(redis_url: str) -> None:
    """A claim that ends after remember but before delivered leaves its answer UNSETTLED for the next copy."""
    replica = store(redis_url)
    key = idempotency_key("alice", "m1", "unused")
    async with replica.claim(key) as claim:
        await claim.remember(REQUEST, ANSWER, 60)
    async with replica.claim(key) as claim:
        assert (claim.found, claim.remembered) == (Found.UNSETTLED, Remembered(REQUEST, ANSWER))
        await claim.delivered()
    async with replica.claim(key) as claim:
        assert claim.found is Found.ANSWERED
    await replica.close()


async def test_answers_are_scoped_by_publisher_and_outlived_by_the_id_of_their_token(redis_url: str) -> None:
    """Another publisher's same message_id is another key; after the window a created token's key is SPENT."""
    replica = store(redis_url, window=0.5)
    key = idempotency_key("alice", "m1", "unused")
    async with replica.claim(key) as claim:
        await claim.remember(REQUEST, ANSWER, 60)
        await claim.delivered()
    async with replica.claim(idempotency_key("bob", "m1", "unused")) as other:
        assert other.found is Found.NEW
    async with replica.claim(key) as claim:
        assert claim.remembered == Remembered(REQUEST, ANSWER)
    await asyncio.sleep(0.6)  # wait-ok: the window's length is what is tested
    async with replica.claim(key) as claim:
        assert (claim.found, claim.remembered) == (Found.SPENT, None)
    await replica.close()


async def test_an_unanswered_claim_is_released_for_the_next(redis_url: str) -> None:
    """A retryable failure remembers nothing: the next claim of the key gets it at once."""
    replica = store(redis_url)
    key = idempotency_key("alice", "m1", "unused")
    async with replica.claim(key):
        pass
    started = time.monotonic()
    async with replica.claim(key) as claim:
        assert claim.found is Found.NEW
    assert time.monotonic() - started < 0.5
    await replica.close()


async def test_without_redis_a_claim_waits_to_its_deadline_and_readiness_says_so() -> None:
    """Redis unreachable: no claim, so no call to Clerk; the request gets deadline_exceeded."""
    replica = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0", 60)
    with pytest.raises(DeadlineExceededError):
        async with replica.claim(idempotency_key("alice", "m1", "unused"), deadline=time.time() + 1.0):
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
    token_ledger: Ledger,
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
    await token_ledger.balanced()


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


async def test_a_replica_that_cannot_open_an_unsettled_answer_lets_its_lease_go_at_once(redis_url: str) -> None:
    """Another sealing key (a roll under way): the replica without it raises, and the key is free for one with it."""
    cipher = AnswerCipher([nacl.utils.random(32)])
    holder, blind, other = (
        RedisIdempotencyStore(redis_url, 60, 5.0, cipher=lambda: cipher),
        store(redis_url),
        RedisIdempotencyStore(redis_url, 60, 5.0, cipher=lambda: cipher),
    )
    key = idempotency_key("alice", "m1", "unused")
    async with holder.claim(key) as claim:
        await claim.remember(REQUEST, ANSWER, 60)  # stopped before its reply's fate was known: unsettled
    reader = redis.asyncio.from_url(redis_url)
    stored = await reader.hget(holder.redis_key(key), "answer")
    await reader.aclose()
    assert stored is not None
    assert b"secret" not in stored
    with pytest.raises(AnswerUnreadableError):
        async with blind.claim(key):
            pytest.fail("a claim on an answer this replica cannot read")
    # Within a second, not after the 5 s lease the blind claim took.
    async with other.claim(key, deadline=time.time() + 1.0) as claim:
        assert (claim.found, claim.remembered) == (Found.UNSETTLED, Remembered(REQUEST, ANSWER))
    for replica in (holder, blind, other):
        await replica.close()
