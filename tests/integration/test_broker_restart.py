"""A broker restart under a running worker."""

from __future__ import annotations

import time

import aio_pika
import pytest

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from service.worker.lifecycle import Worker
from tests.conftest import SettingsFactory, wait_until

pytestmark = pytest.mark.slow


async def test_worker_recovers_from_a_broker_restart_by_itself(
    node: LocalBroker,
    make_settings: SettingsFactory,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
) -> None:
    """Requests in flight across a restart are all answered, and the worker consumes again without a restart."""
    fake_clerk.latency_seconds = 0.02
    worker = Worker(make_settings(amqp_url=node.url, upstream_concurrency=2), name="restart-worker")
    await worker.start()
    try:
        connection = await aio_pika.connect_robust(node.url, client_properties={"connection_name": "restart-test"})
        channel = await connection.channel()
        replies = await channel.declare_queue("restart-replies", durable=True)
        seen: set[str] = set()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.add(message.correlation_id or "")

        await replies.consume(on_reply, no_ack=True)

        async def publish(start: int, count: int) -> None:
            for i in range(start, start + count):
                message = aio_pika.Message(
                    b'{"user_id": "user_r%d"}' % i,
                    correlation_id=f"c{i}",
                    message_id=f"m{i}",
                    reply_to=replies.name,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(message, queue_names["REQUEST_QUEUE"])

        await publish(0, 200)
        await wait_until(lambda: fake_clerk.stats.created >= 10, what="work in flight")
        await node.stop_async()
        assert len(seen) < 200, "the restart came after all the work; the test proves nothing"
        await wait_until(lambda: not worker.readiness()["connected"], what="the worker to notice")
        restarted = time.monotonic()
        await node.start()
        await wait_until(
            lambda: worker.readiness()["connected"] and worker.readiness()["consuming"],
            timeout=60,
            what="the worker to consume again",
        )
        assert time.monotonic() - restarted < 30
        await wait_until(lambda: not channel.is_closed, timeout=30, what="the test's channel to reopen")
        await publish(200, 20)
        await wait_until(lambda: len(seen) == 220, timeout=60, what="every request answered")
        await connection.close()
    finally:
        await worker.shutdown()
