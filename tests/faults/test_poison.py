"""Fault 6: a request that kills every worker that takes it ends in DEAD_LETTER_QUEUE."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from tests.conftest import get_message, wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests

pytestmark = pytest.mark.slow
DELIVERY_LIMIT = 4


async def test_poison_request_is_dead_lettered_after_the_delivery_limit(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
    redis_url: str,
) -> None:
    """Each delivery of the poison request crashes its worker; after DELIVERY_LIMIT the broker gives up on it."""
    poisoned = asyncio.Event()
    release = asyncio.Event()

    async def poison_hook(params: dict[str, Any]) -> None:
        if params.get("user_id") == "user_poison":
            poisoned.set()
            await release.wait()  # hold the call until the worker is killed (released at the end)

    fake_clerk.on_create = poison_hook
    # The store is shared, so a request answered just before a crash is answered with the same token after it.
    worker_processes.env |= {
        "DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "REDIS_URL": redis_url,
        "IDEMPOTENCY_LEASE_SECONDS": "1",
        "UPSTREAM_CONCURRENCY": "4",
    }
    worker = await worker_processes.start()
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_poison"}', message_id="poison", reply_to=replies.queue),
        queue_names["REQUEST_QUEUE"],
    )
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 100)
    # The others are served while the poison hangs. (Killed with them still unanswered, a request
    # would share the poison's fate: every crash counts a delivery of each message its worker held,
    # and the delivery limit dead-letters any of them, as the contract says.)
    await wait_until(lambda: replies.answered == 100, timeout=60, what="the other requests answered")
    for _ in range(DELIVERY_LIMIT + 1):
        await asyncio.wait_for(poisoned.wait(), 30)
        poisoned.clear()
        await worker_processes.stop(worker, signal.SIGKILL)
        worker = await worker_processes.start()
    crashes = DELIVERY_LIMIT + 1
    message = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    figures.record(
        "poison loop",
        delivery_limit=DELIVERY_LIMIT,
        worker_crashes=crashes,
        dead_lettered=message.message_id == "poison",
        reason=message.headers["x-death"][0]["reason"],
        others_answered=replies.answered,
        poison_replies=replies.per_request["poison"],
    )
    release.set()
    assert message.message_id == "poison"
    assert message.headers["x-death"][0]["reason"] == "delivery_limit"
    assert not poisoned.is_set(), "the poison request was delivered again after the limit"
    assert replies.per_request["poison"] == 0
    # Each crash cut the poison's call at Clerk (which makes its token once released) and at most
    # UPSTREAM_CONCURRENCY (4) others: unheld, counted.
    await token_ledger.balanced(cut=crashes * 5)
