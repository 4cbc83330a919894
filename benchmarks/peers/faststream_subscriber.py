"""A FastStream subscriber doing the naive worker's job: msgspec, no access log, prefetch 256, uvloop.

FastStream acks after the handler returns and publishes with confirms on its
default channel. The handler takes the raw message (no pydantic, msgspec
decodes) and FastStream's logger is off, so the figure is the framework's
own cost, not its logging's.

    (with AMQP_URL, REQUEST_QUEUE, CLERK_API_URL and CLERK_SECRET_KEY set)
    python benchmarks/peers/faststream_subscriber.py
"""

from __future__ import annotations

import uvloop
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from job import PREFETCH, Settings, create, session, until_terminated


async def main() -> None:
    """Subscribe until terminated."""
    settings = Settings.from_env()
    broker = RabbitBroker(settings.amqp_url, default_channel=Channel(prefetch_count=PREFETCH), logger=None)
    async with session(settings) as http:

        @broker.subscriber(RabbitQueue(settings.queue, declare=False))
        async def handle(message: RabbitMessage) -> None:
            reply = await create(http, settings, message.body)
            await broker.publish(
                reply,
                routing_key=message.reply_to,
                correlation_id=message.correlation_id,
                content_type="application/json",
                persist=True,
            )

        await broker.start()
        await until_terminated()
        await broker.stop()


if __name__ == "__main__":
    uvloop.run(main())
