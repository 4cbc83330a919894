"""Clerk's rate limit, in one worker and shared by replicas through Redis: no 429, no window over the limit."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.contract.errors import DeadlineExceededError
from sign_in_tokens_client.contract.lanes import Lane

from service.clerk.ratelimit import ClerkRateLimiter
from service.clerk.ratelimit._redis import RedisWindow
from service.local.fake_clerk import FakeClerk, FakeClerkStats
from service.local.rabbitmq import free_port
from tests.conftest import SECRET_KEY, WorkerFactory, wait_until
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests


async def test_a_bulk_backlog_is_drained_at_the_limit_without_a_429(
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
) -> None:
    """200 bulk requests through a Clerk that allows 40 calls in any 1 s: all created, at most 1 % answered 429."""
    fake_clerk.rate_limit = 40
    fake_clerk.rate_window_seconds = 1.0
    await start_worker(clerk_rate_limit=40, clerk_rate_window_seconds=1)
    started = time.monotonic()
    await publish_requests(channel, queue_names["BULK_QUEUE"], replies.queue, 200)
    await wait_until(lambda: replies.answered == 200, timeout=30, what="every request answered")
    assert replies.outcomes == {"created": 200}
    assert fake_clerk.stats.rate_limited <= 2  # at most 1 %, as with three replicas below
    assert time.monotonic() - started >= 4  # 200 calls at 40 a second need four windows past the first


async def test_limiters_sharing_redis_never_exceed_the_limit_together(redis_url: str) -> None:
    """Three limiters (three replicas) on one Redis: every 0.3 s window holds at most 10 grants of all of them."""
    limiters = [ClerkRateLimiter(10, 0.3, redis_url, state_id="k") for _ in range(3)]
    granted: list[float] = []

    async def call(i: int) -> None:
        await limiters[i % 3].acquire(Lane.BULK)
        granted.append(time.monotonic())

    await asyncio.gather(*(call(i) for i in range(60)))
    # Bulk leaves one slot of the ten to the interactive lane, and spreads the rest over the window.
    assert FakeClerkStats(accepted_at={"k": sorted(granted)}).busiest_window("k", 0.3) <= 9
    assert granted[-1] - granted[0] >= 5 * 0.3
    for limiter in limiters:
        await limiter.close()


async def test_a_429_on_one_replica_holds_every_replica(redis_url: str) -> None:
    """A hold set through one limiter delays a slot on another sharing the key."""
    first, second = (ClerkRateLimiter(100, 10.0, redis_url, state_id="k") for _ in range(2))
    await first.on_429(0.4)
    started = time.monotonic()
    await second.acquire(Lane.INTERACTIVE)
    assert time.monotonic() - started >= 0.35
    await first.close()
    await second.close()


async def test_without_redis_no_slot_is_given_and_readiness_says_so() -> None:
    """Redis unreachable: the call waits (to its deadline) instead of going over a limit nobody counts."""
    limiter = ClerkRateLimiter(100, 10.0, f"redis://127.0.0.1:{free_port()}/0", state_id="k")
    with pytest.raises(DeadlineExceededError):
        await limiter.acquire(Lane.INTERACTIVE, deadline=time.time() + 1.0)
    assert not limiter.available
    await limiter.close()


async def test_three_replicas_drain_a_backlog_at_the_limit_without_a_429(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    redis_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    token_ledger: Ledger,
) -> None:
    """Three worker processes sharing the limit through Redis: 300 bulk requests, all created, at most 1 % 429s."""
    fake_clerk.rate_limit = 40
    fake_clerk.rate_window_seconds = 1.0
    for _ in range(3):
        await worker_processes.start(REDIS_URL=redis_url, CLERK_RATE_LIMIT="40", CLERK_RATE_WINDOW_SECONDS="1")
    started = time.monotonic()
    await publish_requests(channel, queue_names["BULK_QUEUE"], replies.queue, 300)
    await wait_until(lambda: replies.answered == 300, timeout=60, what="every request answered")
    elapsed = time.monotonic() - started
    assert replies.outcomes == {"created": 300}
    # A call reaches Clerk a little after it takes its slot; on a loaded machine (the suite runs
    # broker, Clerk, three workers and itself on two cores) that can pass the margin: at most 1 %.
    assert fake_clerk.stats.rate_limited <= 3
    assert elapsed >= 6  # 300 calls at 40 a second, all replicas together
    assert "rate_limit_shared" in worker_processes.logs()
    await token_ledger.balanced()


async def test_an_interactive_request_on_one_replica_goes_before_bulk_waiting_on_another(redis_url: str) -> None:
    """Replica A saturates the window with bulk; four interactive requests on replica B all get slots before A's next bulk."""
    bulk_side, interactive_side = (ClerkRateLimiter(10, 1.0, redis_url, state_id="k") for _ in range(2))
    events: list[str] = []

    async def call(limiter: ClerkRateLimiter, lane: Lane) -> None:
        await limiter.acquire(lane)
        events.append(lane.value)

    bulk = [asyncio.create_task(call(bulk_side, Lane.BULK)) for _ in range(40)]
    await wait_until(lambda: len(events) >= 9, timeout=5, what="bulk at its share of the window")
    interactive = [asyncio.create_task(call(interactive_side, Lane.INTERACTIVE)) for _ in range(4)]
    await asyncio.wait_for(asyncio.gather(*interactive), 5)
    served = events[events.index("interactive") :]
    assert served[:4] == ["interactive"] * 4, served
    for task in bulk:
        task.cancel()
    for limiter in (bulk_side, interactive_side):
        await limiter.close()


async def test_a_429_cuts_the_rate_of_every_replica(redis_url: str) -> None:
    """A 429 seen by one replica: another gets 90 % of the limit in the next window, not all of it."""
    first, second = (RedisWindow(redis_url, 20, 1.0, "sign_in_tokens:clerk_rate:k") for _ in range(2))
    assert await first.on_429(0.01) == 18.0
    assert await second.on_429(0.01) is None  # one cut per hold
    taken, ends = 0, time.monotonic() + 0.5
    while taken == 0 and time.monotonic() < ends:  # asks Redis until the 10 ms hold is over
        taken += await second.take(Lane.INTERACTIVE, 0) == 0.0
    taken += sum([await second.take(Lane.INTERACTIVE, 0) == 0.0 for _ in range(19)])
    assert taken == 18
    for window in (first, second):
        await window.close()


async def test_another_program_on_the_key_costs_few_429s_and_no_request(
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
) -> None:
    """Clerk allows 40 a second; another program spends 12 of them; the worker, set to 40, learns from its 429s.

    Every one of 200 bulk requests is created (429s spend no attempt), and at most 5 % of the
    worker's calls are answered 429.
    """
    fake_clerk.rate_limit = 40
    fake_clerk.rate_window_seconds = 1.0
    await start_worker(clerk_rate_limit=40, clerk_rate_window_seconds=1, max_attempts=3)
    stop = asyncio.Event()
    other_calls = other_429s = 0

    async def other_program() -> None:
        nonlocal other_calls, other_429s
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {SECRET_KEY}"}) as http:
            while not stop.is_set():
                async with http.post(f"{fake_clerk.url}/sign_in_tokens", json={"user_id": "user_other"}) as answer:
                    await answer.read()
                other_calls += 1
                other_429s += answer.status == 429
                await asyncio.sleep(1 / 12)  # wait-ok: the other program's pace

    other = asyncio.create_task(other_program())
    await publish_requests(channel, queue_names["BULK_QUEUE"], replies.queue, 200)
    await wait_until(lambda: replies.answered == 200, timeout=60, what="every request answered")
    stop.set()
    await other
    assert replies.outcomes == {"created": 200}
    ours = fake_clerk.stats.create_calls - other_calls
    our_429s = fake_clerk.stats.rate_limited - other_429s
    assert our_429s <= 0.05 * ours, (our_429s, ours)
