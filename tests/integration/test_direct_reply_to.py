"""Direct reply-to (``amq.rabbitmq.reply-to``): a live token for a caller that waits, a revoke for one that left."""

from __future__ import annotations

import asyncio

import aio_pika
import msgspec
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import get_message, wait_until


async def test_a_direct_reply_to_caller_gets_a_live_token(
    worker: Worker, amqp: AbstractRobustConnection, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """The broker returns a mandatory publish to a direct reply-to name it delivered; the token stays live."""
    channel = await amqp.channel()
    received: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
    reply_to = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)

    async def on_reply(message: AbstractIncomingMessage) -> None:
        if not received.done():
            received.set_result(message)

    await reply_to.consume(on_reply, no_ack=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_direct"}', reply_to="amq.rabbitmq.reply-to", correlation_id="d1"),
        queue_names["REQUEST_QUEUE"],
    )
    reply = await asyncio.wait_for(received, 10)
    body = msgspec.json.decode(reply.body)
    assert (reply.correlation_id, body["outcome"]) == ("d1", "created")
    token_id = body["sign_in_token"]["id"]
    assert fake_clerk.stats.tokens[token_id]["status"] == "pending"
    assert fake_clerk.stats.revoked == set()
    await wait_until(lambda: worker.metrics.requests.labels("interactive", "created", "default")._value.get() == 1)
    assert worker.metrics.revoked._value.get() == 0


async def test_a_direct_reply_to_caller_that_left_gets_its_token_revoked(
    worker: Worker, amqp: AbstractRobustConnection, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """The caller's channel closes while Clerk works: the token is revoked and the request dead-lettered."""
    caller_gone = asyncio.Event()

    async def after_the_caller_left(_: object) -> None:
        await caller_gone.wait()

    fake_clerk.on_create = after_the_caller_left
    caller = await amqp.channel()
    reply_to = await caller.get_queue("amq.rabbitmq.reply-to", ensure=False)

    async def ignore(_: AbstractIncomingMessage) -> None:
        return None

    await reply_to.consume(ignore, no_ack=True)
    await caller.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_gone"}', reply_to="amq.rabbitmq.reply-to", correlation_id="d2"),
        queue_names["REQUEST_QUEUE"],
    )
    await wait_until(lambda: fake_clerk.stats.create_calls == 1, what="the upstream call")
    await caller.close()
    caller_gone.set()
    checker = await amqp.channel()
    dead = await get_message(checker, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "reply_refused"
    await wait_until(lambda: len(fake_clerk.stats.revoked) == 1, what="the revoke")
    assert fake_clerk.stats.revoked == set(fake_clerk.stats.tokens)
