"""The broker: connection, topology, the lane consumers and publish-with-confirm.

One robust connection (aio-pika reconnects and restores channels, queues
and consumers by itself), one channel to consume both lanes, one channel
with publisher confirms to publish replies and dead letters. A publish ends
in one of three ways, and the worker treats each differently:

- confirmed (``Basic.Ack``): the reply is the broker's;
- refused (returned as unroutable, or ``Basic.Nack``): ReplyRefusedError;
- unknown (the connection or channel failed first): ReplyFateUnknownError.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
    ConsumerTag,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError
from yarl import URL

from service.config import Settings
from service.errors import ServiceError
from service.lanes import Lane

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT_SECONDS: Final = 30.0
_CONNECT_TIMEOUT_SECONDS: Final = 10.0
# aio-pika's default is 5 s; a lost broker is retried each second so consumption resumes sooner.
_RECONNECT_INTERVAL_SECONDS: Final = 1.0
# Everything a failed connection or channel can raise while we publish or ack.
CHANNEL_FAILURES: Final = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, asyncio.TimeoutError)


class BrokerUnavailableError(ServiceError):
    """The broker could not be reached within the start-up timeout."""


class ReplyRefusedError(ServiceError):
    """The broker returned the message as unroutable, or nacked it."""


class ReplyFateUnknownError(ServiceError):
    """The connection or channel failed before the broker confirmed the message."""


def broker_address(url: str) -> str:
    """``host:port`` of an AMQP URL, safe to log (no credentials)."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """Open the robust connection, retrying with backoff for STARTUP_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + settings.startup_timeout_seconds
    delay = 0.25
    while True:
        try:
            return await aio_pika.connect_robust(
                settings.amqp_url,
                client_properties={"connection_name": name},
                timeout=_CONNECT_TIMEOUT_SECONDS,
                reconnect_interval=_RECONNECT_INTERVAL_SECONDS,
            )
        except (*CHANNEL_FAILURES, RuntimeError) as exc:
            reason = type(exc).__name__
            if time.monotonic() + delay > deadline:
                msg = (
                    f"cannot reach the broker at {broker_address(settings.amqp_url)} "
                    f"within {settings.startup_timeout_seconds:g} s ({reason})"
                )
                raise BrokerUnavailableError(msg) from None
            log.warning("broker_unreachable", broker=broker_address(settings.amqp_url), reason=reason, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def lane_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of the two request queues: quorum, a delivery limit, dead-lettering."""
    return {
        "x-queue-type": "quorum",
        # RabbitMQ 3.x sets no default: without it a poison message loops forever.
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_letter_queue,
        # Broker-side dead-lettering (delivery limit) confirmed, not best effort.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def lane_queue_names(settings: Settings) -> dict[Lane, str]:
    """The queue of each lane."""
    return {Lane.INTERACTIVE: settings.request_queue, Lane.BULK: settings.bulk_queue}


async def _declare(connection: AbstractRobustConnection, name: str, arguments: dict[str, Any]) -> None:
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        # The queue exists with other arguments (declared by an operator or an
        # older version): use it as it is rather than refuse to start.
        log.warning("queue_exists_with_other_arguments", queue=name)
    finally:
        with contextlib.suppress(*CHANNEL_FAILURES):
            await channel.close()


async def declare_topology(connection: AbstractRobustConnection, settings: Settings) -> None:
    """Declare every queue the service uses; idempotent."""
    quorum = {"x-queue-type": "quorum"}
    await _declare(connection, settings.dead_letter_queue, quorum)
    await _declare(connection, settings.results_queue, quorum)
    for name in lane_queue_names(settings).values():
        await _declare(connection, name, lane_queue_arguments(settings))


OnMessage = Callable[[AbstractIncomingMessage, Lane], Awaitable[None]]


class LaneConsumers:
    """The consumers of both lanes on one channel; paused and resumed together."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings, on_message: OnMessage) -> None:
        """Consume with ``prefetch`` unacknowledged messages per lane."""
        self._connection = connection
        self._settings = settings
        self._on_message = on_message
        self._channel: AbstractRobustChannel | None = None
        self._queues: dict[Lane, AbstractRobustQueue] = {}
        self._tags: dict[Lane, ConsumerTag] = {}
        self._lock = asyncio.Lock()

    @property
    def consuming(self) -> bool:
        """Whether both lanes are being consumed."""
        return len(self._tags) == len(Lane)

    async def open(self) -> None:
        """Open the channel and bind to the (already declared) queues."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        for lane, name in lane_queue_names(self._settings).items():
            self._queues[lane] = await channel.declare_queue(name, passive=True)
        self._channel = channel

    def _callback(self, lane: Lane) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._on_message(message, lane)

        return on_message

    async def resume(self) -> None:
        """Start consuming every lane not already consumed."""
        async with self._lock:
            for lane, queue in self._queues.items():
                if lane not in self._tags:
                    self._tags[lane] = await queue.consume(self._callback(lane))

    async def pause(self) -> None:
        """Stop taking new messages; those delivered stay with their handlers."""
        async with self._lock:
            for lane, tag in list(self._tags.items()):
                with contextlib.suppress(*CHANNEL_FAILURES):
                    await self._queues[lane].cancel(tag)
                del self._tags[lane]


def reply_message(body: bytes, *, content_type: str, correlation_id: str | None, outcome: str) -> aio_pika.Message:
    """A reply as the contract shapes it: persistent, ``x-outcome`` header."""
    return aio_pika.Message(
        body=body,
        content_type=content_type,
        correlation_id=correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={"x-outcome": outcome},
    )


def _copy_for_dead_letter(message: AbstractIncomingMessage, reason: str) -> aio_pika.Message:
    headers = dict(message.headers or {})
    headers.pop("x-delivery-count", None)
    headers["x-dead-letter-reason"] = reason
    headers["x-original-routing-key"] = message.routing_key or ""
    if message.user_id:
        # The user_id property must match the publishing connection's user,
        # so the original publisher travels as a header instead.
        headers["x-original-user-id"] = message.user_id
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


class ReplyPublisher:
    """Publishes replies and dead letters to the default exchange, confirmed."""

    def __init__(self, connection: AbstractRobustConnection, dead_letter_queue: str) -> None:
        """The channel is opened by ``open``."""
        self._connection = connection
        self._dead_letter_queue = dead_letter_queue
        self._channel: AbstractRobustChannel | None = None

    async def open(self) -> None:
        """Open the confirming channel; returned messages raise."""
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def publish(self, message: aio_pika.Message, routing_key: str) -> None:
        """Publish ``mandatory``; return once confirmed, or raise refused / fate unknown."""
        if self._channel is None:
            msg = "ReplyPublisher.open() was not called"
            raise RuntimeError(msg)
        try:
            await self._channel.default_exchange.publish(
                message,
                routing_key,
                mandatory=True,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except DeliveryError:
            # Its text carries the message body: never let it reach a log.
            msg = f"the broker refused the message for {routing_key!r}"
            raise ReplyRefusedError(msg) from None
        except CHANNEL_FAILURES as exc:
            msg = f"no confirm for the message to {routing_key!r} ({type(exc).__name__})"
            raise ReplyFateUnknownError(msg) from None

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Copy the request to DEAD_LETTER_QUEUE with the reason; raise as ``publish``."""
        await self.publish(_copy_for_dead_letter(message, reason), self._dead_letter_queue)
