"""Every token has one fate (delivered to one caller, or revoked) under pauses, stalls and signals.

Each test runs real processes (workers, RabbitMQ, Redis, the stand-in Clerk) into one of the
ways a token could be left with two holders or none, and ends with the token ledger.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.connection import broker_user
from sign_in_tokens_client.contract.messages import Created, Failed, SignInToken, decode_reply
from sign_in_tokens_client.replies import ConnectionLostError

from service.local.fake_clerk import FakeClerk
from service.state.dedup import Found, idempotency_key
from service.state.dedup.memory import MemoryIdempotencyStore
from tests.conftest import SECRET_KEY, WorkerFactory, get_message, wait_until
from tests.faults.conftest import Figures
from tests.faults.proxy import FaultyProxy
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests

pytestmark = pytest.mark.slow


async def _publish(
    channel: AbstractChannel, queue: str, message_id: str, reply_to: str, user: str, *, caller: str | None = None
) -> None:
    """A request for ``user``: a sign-in token, or with ``caller`` (its publisher) an actor token."""
    body = {"user_id": user} if caller is None else {"user_id": user, "actor": {"sub": "user_agent_1"}}
    await channel.default_exchange.publish(
        aio_pika.Message(
            json.dumps(body).encode(),
            message_id=message_id,
            correlation_id=message_id,
            reply_to=reply_to,
            user_id=caller,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        queue,
    )


# Lets any identified caller impersonate: the actor-token cases.
IMPERSONATION_POLICY = """
[defaults]
lanes = ["interactive"]
max_expires_in_seconds = 600
reply_to = ["*"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
"""


@pytest.fixture(params=["memory", "redis"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """A worker's environment for the in-process idempotency store, and for Redis's."""
    if request.param == "memory":
        return {}
    return {"REDIS_URL": request.getfixturevalue("redis_url")}


async def test_a_refused_copy_never_revokes_the_token_a_live_copy_received(
    store_env: dict[str, str],
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
    figures: Figures,
) -> None:
    """Copy one of each request replies to a queue that is gone, copy two to a live one: the live caller's token stays live."""
    fake_clerk.latency_seconds = 0.3
    await worker_processes.start(**store_env)
    ids = [f"dup-{i}" for i in range(5)]
    for message_id in ids:
        await _publish(channel, queue_names["REQUEST_QUEUE"], message_id, f"gone.{uuid.uuid4().hex}", "user_dup")
        await _publish(channel, queue_names["REQUEST_QUEUE"], message_id, replies.queue, "user_dup")
    await wait_until(lambda: replies.answered == len(ids), timeout=30, what="every live copy answered")
    ledger = await token_ledger.balanced()
    received = {next(iter(tokens)) for tokens in replies.tokens.values()}
    figures.record("refused copy, " + ("redis" if store_env else "memory"), ids=len(ids), **ledger.as_dict())
    assert replies.outcomes == {"created": len(ids)}
    assert all(fake_clerk.stats.tokens[token]["status"] == "pending" for token in received)


async def test_a_client_retry_after_a_lost_connection_gets_a_token_that_stays_live(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    amqp_url: str,
    queue_names: dict[str, str],
    token_ledger: Ledger,
) -> None:
    """client.create(message_id=K) loses its connection while Clerk works; the documented retry with K gets a live token."""
    fake_clerk.latency_seconds = 0.3
    await worker_processes.start()
    queues = {"request_queue": queue_names["REQUEST_QUEUE"], "bulk_queue": queue_names["BULK_QUEUE"]}
    first = SignInTokenClient(amqp_url, **queues, name="first-attempt")
    await first.connect()
    call = asyncio.create_task(first.create("user_retry", message_id="retry-1", timeout=20))
    await wait_until(lambda: fake_clerk.stats.create_calls == 1, what="the first attempt at Clerk")
    await first._connection.close()  # type: ignore[union-attr]  # the caller's connection drops
    with pytest.raises(ConnectionLostError):
        await call
    async with SignInTokenClient(amqp_url, **queues, name="retry") as retry:
        token = await retry.create("user_retry", message_id="retry-1", timeout=20)
    token_ledger.delivered(token.id, "caller", "retry-1")
    await token_ledger.balanced()
    assert fake_clerk.stats.tokens[token.id]["status"] == "pending"


@pytest.mark.parametrize("kind", ["sign_in_token", "actor_token"])
async def test_a_replica_paused_past_its_lease_answers_with_the_fenced_token_and_revokes_its_own(
    kind: str,
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    redis_url: str,
    amqp_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
    figures: Figures,
    tmp_path: Path,
) -> None:
    """Replica A is stopped (SIGSTOP) past its claim's lease mid-call; B answers the copy; A resumes: one token for the id.

    For either kind of token: an actor token made twice is revoked at /actor_tokens as a sign-in token is.
    """
    fake_clerk.answer_delay_seconds = 1.5
    env = {"REDIS_URL": redis_url, "IDEMPOTENCY_LEASE_SECONDS": "1"}
    queue, caller, calls = queue_names["REQUEST_QUEUE"], None, lambda: fake_clerk.stats.create_calls
    if kind == "actor_token":
        policy = tmp_path / "policy.toml"
        policy.write_text(IMPERSONATION_POLICY)
        env["POLICY_FILE"] = str(policy)
        queue, caller, calls = (
            queue_names["IMPERSONATION_QUEUE"],
            broker_user(amqp_url),
            lambda: fake_clerk.actors.create_calls,
        )
    replica_a = await worker_processes.start(**env, PREFETCH="1")  # the copy must go to B, not wait in A's buffer
    await _publish(channel, queue, "paused-1", replies.queue, "user_paused", caller=caller)
    await wait_until(lambda: calls() == 1, what="A's call at Clerk")
    replica_a.process.send_signal(signal.SIGSTOP)
    try:
        await worker_processes.start(**env)
        await _publish(channel, queue, "paused-1", replies.queue, "user_paused", caller=caller)
        await wait_until(lambda: replies.answered == 1, timeout=20, what="B's answer")
    finally:
        replica_a.process.send_signal(signal.SIGCONT)
    await wait_until(lambda: replies.per_request["paused-1"] == 2, timeout=20, what="A's answer")
    ledger = await token_ledger.balanced()
    figures.record(f"replica paused past its lease ({kind})", **ledger.as_dict())
    assert replies.tokens_per_request() == {1}
    assert replies.outcomes == {"created": 2}
    assert (ledger.made, ledger.revoked) == (2, 1)
    if kind == "actor_token":
        assert len(fake_clerk.actors.revoked) == 1
    assert "Traceback" not in worker_processes.logs()


async def test_a_redis_stall_shorter_than_the_lease_gives_no_message_id_two_tokens(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    redis_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
    figures: Figures,
) -> None:
    """Two replicas at the rate limit through a proxy that holds all Redis traffic for 4 s, twice; 300 ids arrive twice.

    At the limit, requests hold their claims while they wait for a rate slot: a stall outlasts
    the lease of those whose last renewal came just before it.
    """
    sent = figures.scale(300, 1_000)
    fake_clerk.latency_seconds = 0.1
    proxy = FaultyProxy(int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]))
    await proxy.start()
    try:
        through_proxy = f"redis://127.0.0.1:{proxy.port}/0"
        env = {"REDIS_URL": through_proxy, "CLERK_RATE_LIMIT": "40", "CLERK_RATE_WINDOW_SECONDS": "1", "PREFETCH": "50"}
        for _ in range(2):
            await worker_processes.start(**env)
        for _ in range(2):
            await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, sent, prefix="stall")
        for _ in range(2):
            await wait_until(lambda: sum(replies.per_request.values()) >= sent // 3, timeout=60, what="the drain")
            proxy.hold()
            await asyncio.sleep(4)  # wait-ok: how long Redis stalls is the fault itself
            proxy.unstall()
        await wait_until(lambda: sum(replies.per_request.values()) >= 2 * sent, timeout=120, what="every copy answered")
        # The revocations of the tokens made twice go on after the replies, through the same Redis.
        ledger = await token_ledger.balanced()
    finally:
        await proxy.stop()
    figures.record("redis stalled 4 s twice", ids=sent, copies=2, **ledger.as_dict())
    assert replies.tokens_per_request() == {1}
    assert replies.answered == sent
    assert "Traceback" not in worker_processes.logs()


async def test_sigterm_with_calls_at_clerk_waits_for_their_answers_and_delivers_them(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
    figures: Figures,
) -> None:
    """Clerk makes each token at once and answers 4 s later; SIGTERM with 30 calls out: all 30 delivered, exit 0."""
    fake_clerk.answer_delay_seconds = 4.0
    worker = await worker_processes.start(REQUEST_TIMEOUT_SECONDS="5", SHUTDOWN_GRACE_SECONDS="8")
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 30, prefix="slow")
    await wait_until(lambda: fake_clerk.stats.created == 30, what="30 tokens made")
    started = time.monotonic()
    code = await worker_processes.stop(worker, signal.SIGTERM)
    stopped_in = time.monotonic() - started
    ledger = await token_ledger.balanced()
    figures.record("SIGTERM with slow answers", in_flight=30, stop_s=round(stopped_in, 1), **ledger.as_dict())
    assert code == 0
    assert replies.outcomes == {"created": 30}
    assert stopped_in < 8
    assert ledger.made == 30


async def test_sigterm_at_the_rate_limit_returns_waiting_requests_at_once(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
    figures: Figures,
) -> None:
    """One worker at 10 calls per 10 s with 60 queued: SIGTERM ends it in seconds and sends no further call."""
    worker = await worker_processes.start(CLERK_RATE_LIMIT="10", CLERK_RATE_WINDOW_SECONDS="10")
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 60, prefix="limited")
    await wait_until(lambda: replies.answered == 10, what="the first window's answers")
    signalled = time.monotonic()
    code = await worker_processes.stop(worker, signal.SIGTERM)
    stopped_in = time.monotonic() - signalled
    calls_after = sum(1 for at in fake_clerk.stats.create_call_times if at > signalled)
    ledger = await token_ledger.balanced()
    figures.record("SIGTERM at the rate limit", queued=60, stop_s=round(stopped_in, 1), calls_after_sigterm=calls_after)
    assert code == 0
    assert calls_after == 0
    assert stopped_in < 5
    assert ledger.made == 10


async def test_redis_emptied_mid_drain_spends_nothing_the_last_window_did_not_leave(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    redis_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
    figures: Figures,
) -> None:
    """Two replicas at 40 calls a second; FLUSHALL mid-drain: Clerk answers no 429."""
    sent = figures.scale(300, 1_200)
    fake_clerk.rate_limit = 40
    fake_clerk.rate_window_seconds = 1.0
    env = {"REDIS_URL": redis_url, "CLERK_RATE_LIMIT": "40", "CLERK_RATE_WINDOW_SECONDS": "1"}
    for _ in range(2):
        await worker_processes.start(**env)
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, sent, prefix="flush")
    await wait_until(lambda: replies.answered >= sent // 3, timeout=60, what="the drain under way")
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.flushall()
    await client.aclose()
    flushed_at = replies.answered
    await wait_until(lambda: replies.answered == sent, timeout=60, what="every request answered")
    ledger = await token_ledger.balanced()
    figures.record(
        "redis emptied at the limit",
        sent=sent,
        answered_at_flush=flushed_at,
        calls_answered_429=fake_clerk.stats.rate_limited,
        busiest_1s_window=fake_clerk.stats.busiest_window(SECRET_KEY, 1.0),
        limit=40,
        **ledger.as_dict(),
    )
    assert flushed_at < sent, "the drain ended before the flush: the test proves nothing"
    assert fake_clerk.stats.rate_limited == 0
    assert replies.outcomes == {"created": sent}


async def test_a_revocation_cut_by_sigterm_is_carried_out_by_the_next_worker(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
) -> None:
    """At its limit, a refused reply's token waits for a rate slot to be revoked; SIGTERM: its order waits in its queue."""
    limited = {"CLERK_RATE_LIMIT": "10", "CLERK_RATE_WINDOW_SECONDS": "10"}
    worker = await worker_processes.start(**limited)
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 9, prefix="ok")
    await _publish(channel, queue_names["REQUEST_QUEUE"], "refused-1", f"gone.{uuid.uuid4().hex}", "user_refused")
    await wait_until(lambda: fake_clerk.stats.created == 10 and replies.answered == 9, timeout=20, what="10 tokens")
    await wait_until(lambda: "revocation_ordered" in worker_processes.logs(), what="the revocation's order")
    assert await worker_processes.stop(worker, signal.SIGTERM) == 0
    assert fake_clerk.stats.revoke_calls == 0, "the revocation was to wait for the next window"
    await worker_processes.start(**limited)  # the next worker (a rolling restart) takes the order
    ledger = await token_ledger.balanced(timeout=30)
    assert ledger.revoked == 1


async def test_a_revocation_refused_401_is_held_until_the_key_works(
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    token_ledger: Ledger,
) -> None:
    """The key is rotated at Clerk between a create and its token's revocation: the order waits for the key."""
    worker = await start_worker()

    async def rotate_the_key(_: object) -> None:
        fake_clerk.accepted_keys = {"sk_test_rotated_" + "x" * 20}  # this create was authenticated already

    fake_clerk.on_create = rotate_the_key
    await _publish(channel, queue_names["REQUEST_QUEUE"], "k-1", f"gone.{uuid.uuid4().hex}", "user_401")
    await wait_until(lambda: fake_clerk.stats.revoke_calls >= 1, what="the revocation refused 401")
    fake_clerk.on_create = None
    await wait_until(lambda: not worker.readiness()["key_ok"], what="the key reported rejected")
    assert fake_clerk.stats.revoked == set()
    fake_clerk.accepted_keys = {SECRET_KEY}
    ledger = await token_ledger.balanced(timeout=30)
    assert ledger.revoked == 1


async def test_a_token_remembered_in_process_and_returned_at_sigterm_is_revoked_not_lost(
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
) -> None:
    """Without REDIS_URL the store dies with the worker: a token made but not yet published is revoked at the stop."""
    audit = f"{queue_names['REQUEST_QUEUE']}.audit"
    first = await start_worker(audit_exchange=audit)
    fake_clerk.answer_delay_seconds = 1.5
    await _publish(channel, queue_names["REQUEST_QUEUE"], "mem-1", replies.queue, "user_mem")
    await wait_until(lambda: fake_clerk.stats.create_calls == 1, what="the call at Clerk")
    await channel.exchange_delete(audit)  # its audit event will need a second try, cut by the stop
    await first.shutdown()
    fake_clerk.answer_delay_seconds = 0.0
    await start_worker(audit_exchange=audit)  # the next worker answers the redelivery and takes the order
    await wait_until(lambda: replies.answered == 1, timeout=15, what="the redelivery's reply")
    ledger = await token_ledger.balanced(timeout=15)
    assert (ledger.made, ledger.revoked) == (2, 1)


async def test_a_reused_message_id_refused_does_not_settle_the_answer_it_found(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """An answer whose reply's fate is unknown, a copy with another body: invalid_request, and the answer stays unsettled."""
    worker = await start_worker()
    store = worker.dedup
    assert isinstance(store, MemoryIdempotencyStore)
    key = idempotency_key("guest", "reused", "unused")
    token = SignInToken(
        object="sign_in_token",
        id="sit_unsettled",
        user_id="user_a",
        token="t",
        status="pending",
        created_at=1,
        updated_at=1,
    )
    async with store.claim(key) as claim:  # made, remembered, its reply's confirm lost
        await claim.remember(b'{"user_id":"user_a"}', Created(sign_in_token=token), 60)
        claim.publishing()
    replies = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_b"}', message_id="reused", user_id="guest", reply_to=replies.name),
        queue_names["REQUEST_QUEUE"],
    )
    reply = decode_reply((await get_message(channel, replies.name)).body, None)
    assert isinstance(reply, Failed)
    assert reply.error.code == "invalid_request"
    async with store.claim(key) as claim:
        assert claim.found is Found.UNSETTLED
    await token_ledger.balanced()
