"""Consuming the queues, each with its prefetch, on one channel: paused and resumed together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.connection import CHANNEL_FAILURES
from sign_in_tokens_client.contract.lanes import Source, source_label

from service.amqp.topology import lane_queue_names
from service.config import Settings

# What the consumers hand each delivery to, with the queue's source.
OnMessage = Callable[[DeliveredMessage, Source], Coroutine[Any, Any, None]]

log = structlog.get_logger(__name__)


class LaneConsumers:
    """The consumers of both lanes on one channel; paused and resumed together.

    They consume through aiormq, under aio-pika's robust channel: a delivery
    reaches the worker as aiormq's ``DeliveredMessage``, without aio-pika's
    copy of every property into an ``IncomingMessage`` and the second task it
    starts for each message. The robust channel still reopens itself (and
    re-declares the queues) after a lost connection; its reopen callback then
    consumes again each lane that was consumed on the channel that was lost.
    """

    def __init__(self, connection: AbstractRobustConnection, settings: Settings, on_message: OnMessage) -> None:
        """Consume with ``prefetch`` unacknowledged messages per lane."""
        self._connection = connection
        self._settings = settings
        self._channel: AbstractRobustChannel | None = None
        self._names = lane_queue_names(settings)
        # Each queue's consumer: the channel it was made on, and its tag there.
        self._tags: dict[Source, tuple[aiormq.abc.AbstractChannel, str]] = {}
        self._lock = asyncio.Lock()
        # The deliveries being handled (held here: the loop keeps only weak references to tasks).
        self._handling: set[asyncio.Task[None]] = set()
        self._callbacks = {source: self._callback(on_message, source) for source in self._names}

    @property
    def consuming(self) -> bool:
        """Whether every queue (both lanes, the revocations) is being consumed."""
        return len(self._tags) == len(self._names)

    async def open(self) -> None:
        """Open the channel and bind to the (already declared) queues."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        for name in self._names.values():
            # Declared through aio-pika so that the robust channel declares them again when it reopens.
            await channel.declare_queue(name, passive=True)
        channel.reopen_callbacks.add(self._on_reopen)
        self._channel = channel

    def _callback(
        self, on_message: OnMessage, source: Source
    ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        """The consumer callback: it hands the delivery to a task of the worker's own.

        aiormq runs a callback as a task of its channel and cancels it when the channel closes
        (a lost connection): a request cut there, mid-call at Clerk, would leave a token made and
        held by nobody. The worker's task runs on; its ack fails, and the redelivery is answered
        from the idempotency store with the same token.
        """
        loop = asyncio.get_running_loop()

        async def on_delivery(message: DeliveredMessage) -> None:
            task = loop.create_task(on_message(message, source))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

        return on_delivery

    async def _consume(self, lane: Source) -> None:
        if self._channel is None:
            msg = "LaneConsumers.open() was not called"
            raise RuntimeError(msg)
        underlay = await self._channel.get_underlay_channel()
        ok = await underlay.basic_consume(self._names[lane], self._callbacks[lane])
        self._tags[lane] = (underlay, str(ok.consumer_tag))

    async def resume(self) -> None:
        """Start consuming every lane not already consumed."""
        async with self._lock:
            for source in self._names:
                if source not in self._tags:
                    await self._consume(source)

    async def pause(self) -> None:
        """Stop taking new messages; those delivered stay with their handlers."""
        async with self._lock:
            for lane, (underlay, tag) in list(self._tags.items()):
                with contextlib.suppress(*CHANNEL_FAILURES, RuntimeError):
                    await underlay.basic_cancel(tag)
                del self._tags[lane]

    async def _on_reopen(self, channel: object) -> None:
        """The channel is back: consume again each lane whose consumer went with the old one."""
        del channel
        if self._channel is None:
            return
        current = await self._channel.get_underlay_channel()
        async with self._lock:
            for lane, (underlay, _) in list(self._tags.items()):
                if underlay is current:
                    continue
                try:
                    await self._consume(lane)
                except (*CHANNEL_FAILURES, RuntimeError) as exc:
                    # Not consumed: /readyz says so (consuming: false) rather than a stale tag.
                    del self._tags[lane]
                    log.warning("lane_not_consumed", lane=source_label(lane), reason=type(exc).__name__)
