"""Fault 9: Redis, where replicas share Clerk's rate limit, stopped and started under load."""

from __future__ import annotations

import asyncio

import pytest
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from service.local.redis_server import LocalRedis
from tests.conftest import SECRET_KEY, wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests, readyz, wait_ready

pytestmark = pytest.mark.slow


async def test_redis_lost_under_load_stops_calls_instead_of_exceeding_the_limit(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Two replicas at 40 calls a second; Redis down for a while mid-drain: nothing lost, none over the limit."""
    sent = figures.scale(400, 2_000)
    outage_seconds = figures.scale(3, 20)
    fake_clerk.rate_limit = 40
    fake_clerk.rate_window_seconds = 1.0
    async with LocalRedis() as server:
        workers = [
            await worker_processes.start(REDIS_URL=server.url, CLERK_RATE_LIMIT="40", CLERK_RATE_WINDOW_SECONDS="1")
            for _ in range(2)
        ]
        await publish_requests(channel, queue_names["BULK_QUEUE"], replies.queue, sent)
        await wait_until(lambda: replies.answered >= sent // 4, timeout=60, what="the drain under way")
        await asyncio.to_thread(server.stop)
        answered_at_stop = replies.answered
        await asyncio.sleep(outage_seconds)  # wait-ok: how long Redis is away is the fault itself
        answered_during = replies.answered - answered_at_stop
        await server.start()
        await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
    events = worker_processes.events()
    figures.record(
        "redis restarted",
        sent=sent,
        outage_s=outage_seconds,
        answered_during_outage=answered_during,
        lost=sent - replies.answered,
        duplicate_replies=replies.duplicates,
        calls_answered_429=fake_clerk.stats.rate_limited,
        busiest_1s_window=fake_clerk.stats.busiest_window(SECRET_KEY, 1.0),
        limit=40,
        redis_unavailable_lines=sum(1 for e in events if e["event"] == "redis_unavailable"),
    )
    assert all(w.alive() for w in workers)
    assert answered_at_stop < sent, "the drain ended before Redis stopped: the test proves nothing"
    assert replies.outcomes == {"created": sent}
    assert fake_clerk.stats.rate_limited <= sent // 100  # see test_rate_limit: at most 1 %
    await token_ledger.balanced()


async def test_redis_unreachable_at_start_pauses_the_worker_until_it_answers(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """A worker whose Redis is down at start consumes nothing and is not ready; it resumes when Redis answers."""
    server = LocalRedis()  # not started yet
    try:
        worker = worker_processes.spawn(REDIS_URL=server.url)
        await wait_until(lambda: "worker_started" in worker.log_path.read_text(), timeout=30, what="the worker's start")
        assert "redis_unavailable" in worker.log_path.read_text()
        await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 50)
        await asyncio.sleep(3)  # wait-ok: how long Redis stays away is the fault itself
        ready_while_away = await readyz(worker.port)
        answered_while_away = replies.answered
        await server.start()
        await wait_until(lambda: replies.answered == 50, timeout=30, what="every request answered")
        await wait_ready(worker.port)
    finally:
        await asyncio.to_thread(server.cleanup)
    figures.record(
        "redis unreachable at start",
        sent=50,
        answered_while_away=answered_while_away,
        readyz_while_away=ready_while_away,
        answered=replies.answered,
        clerk_calls=fake_clerk.stats.create_calls,
    )
    assert (ready_while_away, answered_while_away) == (503, 0)
    assert replies.outcomes == {"created": 50}
    assert worker.alive()
    await token_ledger.balanced()
