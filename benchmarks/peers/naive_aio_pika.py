"""A naive aio-pika worker: decode, POST, publish the reply with a confirm, ack; prefetch 256, uvloop.

What a team writes in an afternoon from aio-pika's tutorial. The peer the
service is measured against in ``benchmarks/throughput.py``.

    (with AMQP_URL, REQUEST_QUEUE, CLERK_API_URL and CLERK_SECRET_KEY set)
    python benchmarks/peers/naive_aio_pika.py
"""

from __future__ import annotations

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from job import PREFETCH, Settings, create, session, until_terminated


async def main() -> None:
    """Consume until terminated."""
    settings = Settings.from_env()
    connection = await aio_pika.connect(settings.amqp_url)
    consuming = await connection.channel()
    await consuming.set_qos(prefetch_count=PREFETCH)
    publishing = await connection.channel(publisher_confirms=True)
    queue = await consuming.declare_queue(settings.queue, passive=True)
    async with session(settings) as http:

        async def on_message(message: AbstractIncomingMessage) -> None:
            reply = await create(http, settings, message.body)
            await publishing.default_exchange.publish(
                aio_pika.Message(
                    reply,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=message.reply_to or "",
            )
            await message.ack()

        await queue.consume(on_message)
        await until_terminated()
    await connection.close()


if __name__ == "__main__":
    uvloop.run(main())
