"""Many requests at once: each answered exactly once; the interactive lane first."""

from __future__ import annotations

import asyncio
from collections import Counter

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import Created

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import WorkerFactory, wait_until


async def test_300_concurrent_requests_are_each_answered_exactly_once(
    worker: Worker,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """300 requests in flight together: 300 replies, one per correlation id, 300 tokens."""
    fake_clerk.latency_seconds = 0.005
    replies = await channel.declare_queue(exclusive=True)
    seen: Counter[str] = Counter()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        seen[message.correlation_id or ""] += 1
        assert msgspec.json.decode(message.body)["outcome"] == "created"

    await replies.consume(on_reply, no_ack=True)
    await asyncio.gather(
        *(
            channel.default_exchange.publish(
                aio_pika.Message(b'{"user_id": "user_%d"}' % i, correlation_id=f"c{i}", reply_to=replies.name),
                queue_names["REQUEST_QUEUE"],
            )
            for i in range(300)
        ),
    )
    await wait_until(lambda: len(seen) == 300, timeout=30, what="300 replies")
    # Everything acknowledged and nothing left in flight: no second reply can still come.
    await wait_until(lambda: sum(worker.metrics.in_flight.labels(lane.value)._value.get() for lane in Lane) == 0)
    assert set(seen.values()) == {1}
    assert fake_clerk.stats.created == 300


async def test_interactive_lane_is_served_ahead_of_a_bulk_backlog(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """With 60 bulk requests queued, an interactive one jumps the backlog (FIFO would answer it last)."""
    fake_clerk.latency_seconds = 0.03
    await start_worker(upstream_concurrency=2)
    bulk = [await client.send(b'{"user_id": "user_b%d"}' % i, lane=Lane.BULK) for i in range(60)]
    await wait_until(lambda: fake_clerk.stats.create_calls >= 2, what="bulk work to start")
    interactive = await (await client.send(b'{"user_id": "user_now"}'))
    assert isinstance(interactive.decode(), Created)
    answered_before = sum(1 for f in bulk if f.done() and f.result().received_at < interactive.received_at)
    assert answered_before < 20
    await asyncio.gather(*bulk)
