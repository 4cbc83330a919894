"""Fault 3: Clerk unreachable for a minute (five in --long) under steady load."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from tests.conftest import queue_depth, wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses

pytestmark = pytest.mark.slow
RATE_PER_SECOND = 20
MAX_ATTEMPTS = 5


async def test_clerk_outage_loses_nothing_and_retries_stay_bounded(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Clerk down for 60 s at 20 requests/s: consumption pauses, every request is answered after, attempts bounded."""
    outage = figures.scale(60, 300)
    await worker_processes.start(MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    sent = 0
    depth = 0
    publishing = True

    async def steady_load() -> None:
        nonlocal sent
        while publishing:
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"user_id": "user_%d"}' % sent, correlation_id=str(sent), reply_to=replies.queue),
                queue_names["REQUEST_QUEUE"],
            )
            sent += 1
            await asyncio.sleep(1 / RATE_PER_SECOND)  # wait-ok: the load's rate, not synchronisation

    async def sample_depth() -> None:
        nonlocal depth
        while publishing:
            depth = max(depth, await queue_depth(channel, queue_names["REQUEST_QUEUE"]))
            await asyncio.sleep(0.5)  # wait-ok: the sampling interval of a measurement

    load = asyncio.gather(steady_load(), sample_depth())
    await wait_until(lambda: replies.outcomes["created"] >= 50, what="steady state before the outage")
    await fake_clerk.stop()
    down_at = time.monotonic()
    await asyncio.sleep(outage)  # wait-ok: the length of the outage is the fault
    await fake_clerk.start(port=fake_clerk.port)
    answered_at_recovery = replies.answered
    created_at_recovery = replies.outcomes["created"]
    await asyncio.sleep(10)  # wait-ok: steady load after recovery, part of the fault's shape
    publishing = False
    await load
    await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
    retries = sum(1 for e in worker_processes.events() if e["event"] == "retrying_upstream")
    figures.record(
        "Clerk down",
        outage_s=round(time.monotonic() - down_at - 10),
        sent=sent,
        answered=replies.answered,
        lost=sent - replies.answered,
        created=replies.outcomes["created"],
        failed_upstream_unavailable=replies.outcomes["upstream_unavailable"],
        answered_after_recovery=replies.answered - answered_at_recovery,
        created_after_recovery=replies.outcomes["created"] - created_at_recovery,
        max_queue_depth=depth,
        max_attempts_in_a_reply=replies.max_attempts,
        retries_per_request=round(retries / sent, 2),
    )
    assert replies.answered == sent
    assert replies.duplicates == 0
    assert replies.max_attempts <= MAX_ATTEMPTS
    assert depth > 0, "consumption did not pause: requests were not left in the queue"
    # Only requests already held by the worker (its prefetch) can outlast OUTAGE_HOLD_SECONDS.
    assert replies.outcomes["upstream_unavailable"] <= 100
    assert replies.outcomes["created"] - created_at_recovery > 0
    await token_ledger.balanced()
