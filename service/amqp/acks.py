"""Acknowledgements in runs: one ``basic.ack`` with ``multiple`` for the deliveries finished together.

A delivery is acknowledged only once its reply is confirmed, as before; what
changes is how many frames that takes. The acks asked for while the event
loop runs its ready callbacks are sent together, at the end of that pass: the
longest run of delivery tags that are all settled by this worker, from the
lowest tag not yet settled, goes as one ``basic.ack(multiple=True)``, and any
other tag as its own ``basic.ack``. A delivery still being worked on (a
retry, a rate slot, a probe) is never covered by a ``multiple``, and never
holds back the acks of those behind it: they go one by one.

A tag is covered by a ``multiple`` only when every tag below it on its
channel was settled here (acked, or returned with ``nack``): a delivery the
worker never saw is never acknowledged. Tags belong to a channel; a channel
that is replaced (the connection came back) starts a new run.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Final

import aiormq.abc
from aiormq.abc import DeliveredMessage

Channel = aiormq.abc.AbstractChannel
# Which channels took a pass's acks.
Taken = dict[Channel, bool]
# Settled tags kept above a tag never settled; past this the channel acks one by one.
_MAX_GAP_TAGS: Final = 65_536


class _Run:
    """One channel's settled tags: every tag up to ``floor``, and ``above`` it."""

    __slots__ = ("above", "contiguous", "floor")

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()
        self.contiguous = True

    def settle(self, tags: set[int]) -> tuple[int | None, list[int]]:
        """Settle ``tags``: the tag to ack with ``multiple`` (or None), and those to ack alone."""
        self.above |= tags
        top = self.floor
        while top + 1 in self.above:
            top += 1
            self.above.discard(top)
        covered = [tag for tag in tags if tag <= top]
        # The highest of these tags, not ``top``: a tag settled before may not be acked again.
        multiple = max(covered) if covered and self.contiguous else None
        alone = sorted(tag for tag in tags if tag > top or (multiple is None and tag in covered))
        self.floor = top
        if len(self.above) > _MAX_GAP_TAGS:  # a tag below was never settled here: stop counting
            self.contiguous = False
            self.above.clear()
        return multiple, alone


class Acks:
    """Acknowledgements of the deliveries of any number of channels, sent in runs."""

    def __init__(self) -> None:
        """No delivery acknowledged yet."""
        self._runs: weakref.WeakKeyDictionary[Channel, _Run] = weakref.WeakKeyDictionary()
        self._pending: dict[Channel, set[int]] = {}
        self._sent: asyncio.Future[Taken] | None = None
        # One pass's frames at a time: a later ``multiple`` must not overtake an earlier one.
        self._sending = asyncio.Lock()
        self._flushes: set[asyncio.Task[Taken]] = set()

    async def ack(self, message: DeliveredMessage) -> bool:
        """Acknowledge ``message`` with the others of this pass; False when its channel failed first."""
        channel = message.channel
        tag = message.delivery_tag
        if tag is None:
            return True
        self._pending.setdefault(channel, set()).add(tag)
        if self._sent is None:
            loop = asyncio.get_running_loop()
            self._sent = loop.create_future()
            loop.call_soon(self._flush_soon)
        return (await asyncio.shield(self._sent)).get(channel, False)

    def settled(self, message: DeliveredMessage) -> None:
        """Count ``message`` as settled another way (returned with ``nack``)."""
        if message.delivery_tag is not None:
            self._run(message.channel).settle({message.delivery_tag})

    def _run(self, channel: Channel) -> _Run:
        run = self._runs.get(channel)
        if run is None:
            run = self._runs[channel] = _Run()
        return run

    def _flush_soon(self) -> None:
        pending, self._pending = self._pending, {}
        sent, self._sent = self._sent, None
        task = asyncio.ensure_future(self._send(pending))
        self._flushes.add(task)  # held until done: the loop keeps only a weak reference to a task
        task.add_done_callback(self._flushes.discard)
        if sent is not None:
            task.add_done_callback(lambda done: _resolve(sent, done))

    async def _send(self, pending: dict[Channel, set[int]]) -> Taken:
        """Send each channel's acks; which channels took them."""
        async with self._sending:
            return await self._send_locked(pending)

    async def _send_locked(self, pending: dict[Channel, set[int]]) -> Taken:
        outcome = {}
        for channel, tags in pending.items():
            multiple, alone = self._run(channel).settle(tags)
            frames = [(tag, False) for tag in alone]
            if multiple is not None:
                frames.insert(0, (multiple, True))
            try:
                for i, (tag, covers) in enumerate(frames):
                    # The last waits until it is written, and so the others before it: an ack
                    # still queued when the connection closes would be lost.
                    await channel.basic_ack(tag, multiple=covers, wait=i == len(frames) - 1)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                outcome[channel] = False
            else:
                outcome[channel] = True
        return outcome


def _resolve(
    sent: asyncio.Future[Taken],
    done: asyncio.Future[Taken],
) -> None:
    if sent.done():
        return
    if done.cancelled():
        sent.set_result({})
    elif (error := done.exception()) is not None:
        sent.set_exception(error)
    else:
        sent.set_result(done.result())
