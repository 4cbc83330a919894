"""One worker at Clerk's limit: every request created, no 429, no window over the limit."""

from __future__ import annotations

import time

from aio_pika.abc import AbstractChannel

from service.fake_clerk import FakeClerk
from tests.conftest import SECRET_KEY, WorkerFactory, wait_until
from tests.workers import Replies, publish_requests


async def test_a_bulk_backlog_is_drained_at_the_limit_without_a_429(
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
) -> None:
    """200 bulk requests through a Clerk that allows 40 calls in any 1 s: all created, zero 429s."""
    fake_clerk.rate_limit = 40
    fake_clerk.rate_window_seconds = 1.0
    await start_worker(clerk_rate_limit=40, clerk_rate_window_seconds=1)
    started = time.monotonic()
    await publish_requests(channel, queue_names["BULK_QUEUE"], replies.queue, 200)
    await wait_until(lambda: replies.answered == 200, timeout=30, what="every request answered")
    assert replies.outcomes == {"created": 200}
    assert fake_clerk.stats.rate_limited == 0
    assert fake_clerk.stats.busiest_window(SECRET_KEY, 1.0) <= 40
    assert time.monotonic() - started >= 4  # 200 calls at 40 a second need four windows past the first
