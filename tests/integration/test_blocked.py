"""A broker resource alarm: a blocked connection is waited for, never taken for a lost reply."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from tests.conftest import WorkerFactory, wait_until
from tests.workers import count_replies

pytestmark = pytest.mark.slow
SET_ALARM = "rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []})."
CLEAR_ALARM = "rabbit_alarm:clear_alarm({resource_limit, memory, node()})."
CONFIRM_TIMEOUT_SECONDS = 1.0
ALARM_SECONDS = 5.0


async def test_a_reply_held_by_a_memory_alarm_is_delivered_once_when_it_clears(
    node: LocalBroker,
    start_worker: WorkerFactory,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
) -> None:
    """An alarm five times CONFIRM_TIMEOUT_SECONDS: one reply and one token per request, readiness says blocked."""
    worker = await start_worker(amqp_url=node.url, confirm_timeout_seconds=CONFIRM_TIMEOUT_SECONDS)
    connection = await aio_pika.connect_robust(node.url)
    channel = await connection.channel()
    replies, _ = await count_replies(channel, f"{queue_names['REQUEST_QUEUE']}.replies")
    alarm_set = asyncio.Event()

    async def after_the_alarm(_: object) -> None:
        await alarm_set.wait()  # Clerk answers, and the replies are published, only once the alarm is on

    fake_clerk.on_create = after_the_alarm
    for i, message_id in enumerate(("with-id", None)):
        await channel.default_exchange.publish(
            aio_pika.Message(
                b'{"user_id": "user_b%d"}' % i, message_id=message_id, correlation_id=f"b{i}", reply_to=replies.queue
            ),
            queue_names["REQUEST_QUEUE"],
        )
    await wait_until(lambda: fake_clerk.stats.create_calls == 2, what="the upstream calls")
    await node.ctl("eval", SET_ALARM)
    alarm_set.set()
    try:
        await wait_until(lambda: not worker.readiness()["broker_unblocked"], timeout=15, what="the worker blocked")
        await asyncio.sleep(ALARM_SECONDS)  # wait-ok: how long the alarm lasts is the fault itself
        assert replies.answered == 0
        assert not worker.readiness()["broker_unblocked"]
    finally:
        await node.ctl("eval", CLEAR_ALARM)
    await wait_until(lambda: replies.answered == 2, timeout=20, what="both replies")
    await wait_until(lambda: worker.readiness()["broker_unblocked"], what="unblocked")
    await wait_until(lambda: worker.metrics.requests.labels("interactive", "created", "default")._value.get() == 2)
    assert replies.duplicates == 0
    assert fake_clerk.stats.created == 2
    assert fake_clerk.stats.revoked == set()
    await connection.close()
