"""A client of the service: publish requests, receive their replies.

It publishes to the default exchange with the lane's queue as routing key,
with a private exclusive reply queue as ``reply_to``, and matches replies to
requests by ``correlation_id``. The ``request`` command, the demo and the
benchmarks use it; so can any Python caller.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Self

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from service import amqp_wire
from service.broker import open_connection
from service.lanes import Lane
from service.messages import JSON, MSGPACK, Reply, decode_reply

amqp_wire.install()


@dataclass(frozen=True, slots=True)
class ReceivedReply:
    """A reply as it arrived."""

    body: bytes
    content_type: str | None
    correlation_id: str | None
    headers: dict[str, Any]
    received_at: float

    def decode(self) -> Reply:
        """The typed reply."""
        return decode_reply(self.body, self.content_type)


class TokenClient:
    """Sends sign-in token requests and waits for their replies."""

    def __init__(
        self,
        amqp_url: str,
        *,
        request_queue: str = "sign_in_tokens.create",
        bulk_queue: str = "sign_in_tokens.create.bulk",
        name: str = "sign-in-tokens-client",
    ) -> None:
        """A client for the service's queues; ``connect`` before use."""
        self._url = amqp_url
        self._queues = {Lane.INTERACTIVE: request_queue, Lane.BULK: bulk_queue}
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._pending: dict[str, asyncio.Future[ReceivedReply]] = {}

    async def connect(self) -> None:
        """Connect and start listening on a private reply queue; BrokerUnavailableError says why not."""
        self._connection = await open_connection(self._url, self._name)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._reply_queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        """Close the connection; pending requests fail."""
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def __aenter__(self) -> Self:
        """Connect."""
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        """Close."""
        await self.close()

    @property
    def reply_queue(self) -> str:
        """The name of this client's reply queue."""
        if self._reply_queue is None:
            msg = "TokenClient.connect() was not called"
            raise RuntimeError(msg)
        return self._reply_queue.name

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(
                ReceivedReply(
                    body=message.body,
                    content_type=message.content_type,
                    correlation_id=message.correlation_id,
                    headers=dict(message.headers or {}),
                    received_at=time.monotonic(),
                ),
            )

    async def send(
        self,
        body: bytes,
        *,
        lane: Lane = Lane.INTERACTIVE,
        content_type: str | None = JSON,
        message_id: str | None = None,
        deadline_ms: int | None = None,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[ReceivedReply]:
        """Publish one request body (confirmed); return a future of its reply."""
        if self._channel is None:
            msg = "TokenClient.connect() was not called"
            raise RuntimeError(msg)
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[ReceivedReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        all_headers = dict(headers or {})
        if deadline_ms is not None:
            all_headers["x-deadline"] = deadline_ms
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            correlation_id=correlation_id,
            message_id=message_id or correlation_id,
            reply_to=self.reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=all_headers or None,
        )
        try:
            await self._channel.default_exchange.publish(message, self._queues[lane])
        except BaseException:
            self._pending.pop(correlation_id, None)
            raise
        return future

    async def request(
        self,
        user_id: str,
        *,
        expires_in_seconds: int | None = None,
        org_id: str | None = None,
        lane: Lane = Lane.INTERACTIVE,
        msgpack: bool = False,
        timeout: float = 30.0,  # noqa: ASYNC109 - a caller's bound on the whole round trip
    ) -> Reply:
        """Ask for one token and wait for the reply; no token is created after ``timeout`` (``x-deadline``)."""
        fields: dict[str, Any] = {"user_id": user_id}
        if expires_in_seconds is not None:
            fields["expires_in_seconds"] = expires_in_seconds
        if org_id is not None:
            fields["org_id"] = org_id
        encode = msgspec.msgpack.encode if msgpack else msgspec.json.encode
        deadline_ms = int((time.time() + timeout) * 1000)
        future = await self.send(
            encode(fields), lane=lane, content_type=MSGPACK if msgpack else JSON, deadline_ms=deadline_ms
        )
        received = await asyncio.wait_for(future, timeout)
        return received.decode()
