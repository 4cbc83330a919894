"""Consuming queues, each with its prefetch, on one channel: paused and resumed together, or one by one.

The worker's lanes (and its other request queues) are one set; with several Clerk instances, the
instances' hold queues are another, each consumed while its instance works.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Coroutine, Hashable
from typing import Any, Generic, TypeVar

import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.connection import CHANNEL_FAILURES

K = TypeVar("K", bound=Hashable)

log = structlog.get_logger(__name__)


class Consumers(Generic[K]):
    """The consumers of named queues on one channel (a lane's, a hold queue's): paused and resumed together.

    They consume through aiormq, under aio-pika's robust channel: a delivery
    reaches the worker as aiormq's ``DeliveredMessage``, without aio-pika's
    copy of every property into an ``IncomingMessage`` and the second task it
    starts for each message. The robust channel still reopens itself (and
    re-declares the queues) after a lost connection; its reopen callback then
    consumes again each lane that was consumed on the channel that was lost.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        prefetch: int,
        names: dict[K, str],
        on_message: Callable[[DeliveredMessage, K], Coroutine[Any, Any, None]],
    ) -> None:
        """Consume the queue ``names[k]`` with ``prefetch`` unacknowledged messages; ``on_message`` gets ``k``."""
        self._connection = connection
        self._prefetch = prefetch
        self._on_message = on_message
        self._channel: AbstractRobustChannel | None = None
        self._names = dict(names)
        # Each queue's consumer: the channel it was made on, and its tag there.
        self._tags: dict[K, tuple[aiormq.abc.AbstractChannel, str]] = {}
        self._lock = asyncio.Lock()
        # The deliveries being handled (held here: the loop keeps only weak references to tasks).
        self._handling: set[asyncio.Task[None]] = set()
        self._callbacks = {key: self._callback(key) for key in self._names}

    @property
    def consuming(self) -> bool:
        """Whether every queue (both lanes, the revocations) is being consumed."""
        return len(self._tags) == len(self._names)

    @property
    def keys(self) -> list[K]:
        """The queues' keys."""
        return list(self._names)

    async def open(self) -> None:
        """Open the channel and bind to the (already declared) queues."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        channel.reopen_callbacks.add(self._on_reopen)
        self._channel = channel
        for name in self._names.values():
            await self._declared(name)

    async def _declared(self, name: str) -> None:
        """Declared through aio-pika (passively) so that the robust channel declares it again when it reopens."""
        if self._channel is None:
            msg = "Consumers.open() was not called"
            raise RuntimeError(msg)
        await self._channel.declare_queue(name, passive=True)

    async def forget(self, key: K) -> None:
        """The queue of ``key`` was deleted and declared again: its consumer went with it (consumed at ``resume``)."""
        async with self._lock:
            found = self._tags.pop(key, None)
            if found is not None:
                underlay, tag = found
                with contextlib.suppress(*CHANNEL_FAILURES, RuntimeError):
                    await underlay.basic_cancel(tag)

    async def add(self, key: K, name: str) -> None:
        """One more queue (already declared), not consumed until ``resume``."""
        if key in self._names:
            return
        await self._declared(name)
        self._names[key] = name
        self._callbacks[key] = self._callback(key)

    def _callback(self, key: K) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        """The consumer callback: it hands the delivery to a task of the worker's own.

        aiormq runs a callback as a task of its channel and cancels it when the channel closes
        (a lost connection): a request cut there, mid-call at Clerk, would leave a token made and
        held by nobody. The worker's task runs on; its ack fails, and the redelivery is answered
        from the idempotency store with the same token.
        """
        loop = asyncio.get_running_loop()
        on_message = self._on_message

        async def on_delivery(message: DeliveredMessage) -> None:
            task = loop.create_task(on_message(message, key))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

        return on_delivery

    async def _consume(self, key: K) -> None:
        if self._channel is None:
            msg = "Consumers.open() was not called"
            raise RuntimeError(msg)
        underlay = await self._channel.get_underlay_channel()
        ok = await underlay.basic_consume(self._names[key], self._callbacks[key])
        self._tags[key] = (underlay, str(ok.consumer_tag))

    async def resume(self, only: Collection[K] | None = None) -> None:
        """Start consuming every queue (or those of ``only``) not already consumed."""
        async with self._lock:
            for key in self._names:
                if key not in self._tags and (only is None or key in only):
                    await self._consume(key)

    async def pause(self, only: Collection[K] | None = None) -> None:
        """Stop taking new messages (from every queue, or those of ``only``); those delivered stay in hand."""
        async with self._lock:
            for key, (underlay, tag) in list(self._tags.items()):
                if only is not None and key not in only:
                    continue
                with contextlib.suppress(*CHANNEL_FAILURES, RuntimeError):
                    await underlay.basic_cancel(tag)
                del self._tags[key]

    async def _on_reopen(self, channel: object) -> None:
        """The channel is back: consume again each lane whose consumer went with the old one."""
        del channel
        if self._channel is None:
            return
        current = await self._channel.get_underlay_channel()
        async with self._lock:
            for key, (underlay, _) in list(self._tags.items()):
                if underlay is current:
                    continue
                try:
                    await self._consume(key)
                except (*CHANNEL_FAILURES, RuntimeError) as exc:
                    # Not consumed: /readyz says so (consuming: false) rather than a stale tag.
                    del self._tags[key]
                    log.warning("lane_not_consumed", queue=self._names[key], reason=type(exc).__name__)
