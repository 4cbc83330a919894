"""Clerk's rate limit, in one worker and shared by replicas through Redis: no 429, no window over the limit."""

from __future__ import annotations

import asyncio
import time

import pytest
from aio_pika.abc import AbstractChannel

from service.errors import DeadlineExceededError
from service.fake_clerk import FakeClerk, FakeClerkStats
from service.lanes import Lane
from service.local_broker import free_port
from service.ratelimit import ClerkRateLimiter
from tests.conftest import WorkerFactory, wait_until
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
    limiters = [ClerkRateLimiter(10, 0.3, redis_url, key_id="k") for _ in range(3)]
    granted: list[float] = []

    async def call(i: int) -> None:
        await limiters[i % 3].acquire(Lane.BULK)
        granted.append(time.monotonic())

    await asyncio.gather(*(call(i) for i in range(60)))
    assert FakeClerkStats(accepted_at={"k": sorted(granted)}).busiest_window("k", 0.3) == 10
    assert granted[-1] - granted[0] >= 5 * 0.3
    for limiter in limiters:
        await limiter.close()


async def test_a_429_on_one_replica_holds_every_replica(redis_url: str) -> None:
    """A hold set through one limiter delays a slot on another sharing the key."""
    first, second = (ClerkRateLimiter(100, 10.0, redis_url, key_id="k") for _ in range(2))
    await first.hold(0.4)
    started = time.monotonic()
    await second.acquire(Lane.INTERACTIVE)
    assert time.monotonic() - started >= 0.35
    await first.close()
    await second.close()


async def test_without_redis_no_slot_is_given_and_readiness_says_so() -> None:
    """Redis unreachable: the call waits (to its deadline) instead of going over a limit nobody counts."""
    limiter = ClerkRateLimiter(100, 10.0, f"redis://127.0.0.1:{free_port()}/0", key_id="k")
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
