"""What cannot be answered: undecodable requests and refused replies."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Failed

from service.amqp.publisher import _AbsentMessageId
from service.amqp.topology import declare_topology
from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import SettingsFactory, get_message, wait_until


async def test_undecodable_request_without_reply_to_is_dead_lettered(
    worker: Worker,
    channel: AbstractChannel,
    queue_names: dict[str, str],
) -> None:
    """A body that is not an object and has no `reply_to` lands in DEAD_LETTER_QUEUE, with the reason."""
    await channel.default_exchange.publish(
        aio_pika.Message(b"\xff\x00garbage", message_id="bad-1"),
        queue_names["REQUEST_QUEUE"],
    )
    message = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert (message.body, message.message_id) == (b"\xff\x00garbage", "bad-1")
    assert message.headers["x-dead-letter-reason"] == "undecodable"
    assert message.headers["x-original-routing-key"] == queue_names["REQUEST_QUEUE"]


async def test_undecodable_request_with_reply_to_is_answered(worker: Worker, client: SignInTokenClient) -> None:
    """A body that is not an object but has `reply_to` gets `invalid_request`."""
    reply = (await (await client.send(b"[1, 2, 3]"))).decode()
    assert isinstance(reply, Failed)
    assert reply.error.code == "invalid_request"


async def test_unsupported_content_type_is_answered_invalid_request(worker: Worker, client: SignInTokenClient) -> None:
    """A content type other than JSON or MessagePack is `invalid_request`, answered in JSON."""
    received = await (await client.send(b"<user_id>u</user_id>", content_type="application/xml"))
    reply = received.decode()
    assert isinstance(reply, Failed)
    assert "content_type" in reply.error.message


async def test_token_for_a_missing_reply_queue_is_revoked_and_request_dead_lettered(
    worker: Worker,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """A reply the broker returns as unroutable: its token is revoked, the request dead-lettered."""
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_gone"}', reply_to="no-such-queue", message_id="gone-1"),
        queue_names["REQUEST_QUEUE"],
    )
    message = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert message.headers["x-dead-letter-reason"] == "reply_refused"
    assert message.body == b'{"user_id": "user_gone"}'
    assert fake_clerk.stats.created == 1
    await wait_until(lambda: fake_clerk.stats.revoked == set(fake_clerk.stats.tokens), what="revocation")
    assert b"eyJ" not in message.body


async def test_a_message_redelivered_past_the_delivery_limit_is_dead_lettered_by_the_broker(
    make_settings: SettingsFactory,
    amqp: AbstractRobustConnection,
    channel: AbstractChannel,
    queue_names: dict[str, str],
) -> None:
    """A message returned DELIVERY_LIMIT times (a poison loop) ends in DEAD_LETTER_QUEUE, not in a loop."""
    settings = make_settings(delivery_limit=3)
    await declare_topology(amqp, settings)
    await channel.default_exchange.publish(aio_pika.Message(b'{"user_id": "user_poison"}'), settings.request_queue)
    queue = await channel.declare_queue(settings.request_queue, passive=True)
    deliveries = 0
    while (message := await queue.get(no_ack=False, fail=False)) is not None or deliveries == 0:
        if message is not None:
            deliveries += 1
            await message.nack(requeue=True)
    dead = await get_message(channel, settings.dead_letter_queue)
    assert dead.body == b'{"user_id": "user_poison"}'
    assert deliveries == 4
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"


async def test_a_dead_lettered_copy_keeps_the_requests_properties(
    worker: Worker,
    channel: AbstractChannel,
    queue_names: dict[str, str],
) -> None:
    """Priority, type, app_id and an absent message_id stay as they were; an expiration moves to a header."""
    request = aio_pika.Message(b"not json", priority=7, expiration=60, type="t", app_id="caller-app")
    properties = request.properties
    properties.message_id = _AbsentMessageId()  # aiormq would invent one for our publish too
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(request.body, routing_key=queue_names["REQUEST_QUEUE"], properties=properties)
    message = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert (message.priority, message.type, message.app_id) == (7, "t", "caller-app")
    assert message.message_id is None
    assert message.expiration is None
    assert message.headers["x-original-expiration"] == "60000"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
