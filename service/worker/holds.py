"""Several Clerk instances: a held instance's requests wait in its own queue, and nobody else's wait with them.

With CLERK_INSTANCES_FILE, a request for an instance that cannot take it now (its key rejected,
Clerk down for it, or, for a bulk request, its rate limit full already) is moved to one of the
instance's hold queues (HOLD_QUEUE_PREFIX): ``sign_in_tokens.hold.<instance>`` for interactive
work (the interactive lane, impersonations, callers' revocations), ``....bulk`` for the bulk
lane's, ``....revocations`` for the workers' own orders to revoke (no delivery limit, as their
own queue). Published by the worker (so its ``user_id`` is the worker's, which RabbitMQ checks),
the caller in ``x-caller`` and the queue it was taken from in ``x-source``; the original is
acknowledged once the copy is confirmed. Each hold queue is consumed while its instance works,
and its requests are answered as if taken from their own queue (their lane's priority at Clerk,
their caller's rules, their deadline). The lanes stay free for every other instance.
docs/design.md says why this design and not another.

Without the file (one key, ``default``) nothing moves: a rejected key or an outage pauses the
worker, as it always has (``key_probe.py``): there is no other instance to serve meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Final, get_args

import structlog
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.contract.errors import ShutdownRequestedError, UpstreamUnavailableError
from sign_in_tokens_client.contract.lanes import Source, source_label

from service.amqp import broker, topology
from service.amqp.consumers import Consumers
from service.amqp.publisher import SOURCE_HEADER, header_text, held_caller
from service.clerk.retry import probe_delays
from service.clerk.upstreams import HoldReason, InstanceHeldError
from service.config import HoldKind
from service.worker.parts import Parts
from service.worker.settle import Settle

log = structlog.get_logger(__name__)

# Handles one request taken from a queue: the source it counts as, and whether it came from a hold queue.
Handle = Callable[[DeliveredMessage, Source, bool], Awaitable[None]]
# One hold queue: its instance, and which of the instance's three it is.
HoldKey = tuple[str, HoldKind]
KINDS: Final[tuple[HoldKind, ...]] = get_args(HoldKind)
# After a hold queue refused a request twice (declared again between), the wait before it goes back to its queue.
_REFUSED_WAIT_SECONDS: Final = 1.0


class InstanceHolds:
    """The hold queues: moving a request there, consuming each while its instance works, probing a rejected key."""

    def __init__(self, parts: Parts, settle: Settle, handle: Handle) -> None:
        """Move and settle through ``parts`` and ``settle``; a request taken from a hold queue goes to ``handle``."""
        self.parts = parts
        self.settle = settle
        self._handle = handle
        self._sources = {source_label(source): source for source in topology.lane_queue_names(parts.settings)}
        self._consumers: Consumers[HoldKey] | None = None
        self._connection: AbstractRobustConnection | None = None
        # While the worker is paused (Redis away, a stop), no hold queue is consumed either.
        self._paused = True
        self._key_probes: dict[str, asyncio.Task[None]] = {}
        # The instances held at the last ``follow``.
        self._held: set[str] = set()

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The key probes running (a stop waits for them)."""
        return list(self._key_probes.values())

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Declare each instance's hold queues, open their consumers on a channel of their own (not consuming yet)."""
        self._connection = connection
        self._consumers = Consumers(connection, self.parts.settings.prefetch, {}, self._on_held)
        await self._consumers.open()
        for instance in self.parts.upstreams:
            await self.add(instance)

    async def add(self, instance: str) -> None:
        """An instance's three hold queues, declared; consumed at the next ``follow`` (a new instance at SIGHUP)."""
        if self._consumers is None:
            return
        for kind in KINDS:
            await self._declare(instance, kind)
            await self._consumers.add((instance, kind), self.parts.settings.hold_queue(instance, kind))

    async def _declare(self, instance: str, kind: HoldKind) -> None:
        if self._connection is not None:
            name = self.parts.settings.hold_queue(instance, kind)
            await topology.declare_queues(
                self._connection, {name: topology.hold_queue_arguments(self.parts.settings, kind)}
            )

    async def pause(self) -> None:
        """The worker pauses: consume no hold queue."""
        self._paused = True
        if self._consumers is not None:
            await self._consumers.pause()

    async def resume(self) -> None:
        """Consume the hold queue of each instance that works (unless the worker is paused or stopping)."""
        self._paused = False
        await self.follow()

    async def follow(self) -> None:
        """Consume the hold queues of the instances that work, and only theirs.

        An instance a SIGHUP removed: its held requests are taken (and answered ``invalid_request``,
        as a new one naming it would be); its orders to revoke wait until it is back.
        """
        consumers = self._consumers
        if consumers is None:
            return
        upstreams = self.parts.upstreams
        for name, upstream in upstreams.items():
            reason = upstream.hold_reason
            if reason is not None and name not in self._held:
                # Newly held: the requests waiting for its rate slot go to its hold queues now, not at their call.
                upstream.clerk.limiter.flush(functools.partial(InstanceHeldError, name, reason))
        self._held = {name for name, upstream in upstreams.items() if upstream.held}

        def waits(key: HoldKey) -> bool:
            instance, kind = key
            upstream = upstreams.get(instance)
            return upstream.held if upstream is not None else kind == "revocations"

        await consumers.pause([key for key in consumers.keys if waits(key)])
        if not self._paused and not self.parts.stopping.is_set():
            await consumers.resume([key for key in consumers.keys if not waits(key)])

    async def move(
        self, message: DeliveredMessage, source: Source, instance: str, reason: HoldReason, *, held: bool
    ) -> None:
        """Move a request to ``instance``'s hold queue, acknowledged once the copy is confirmed.

        ``held``: it came from a hold queue already (its caller is in ``x-caller``).
        """
        parts = self.parts
        caller = held_caller(message) if held else message.header.properties.user_id
        kind = topology.hold_kind(source)
        queue = parts.settings.hold_queue(instance, kind)
        for last in (False, True):
            try:
                await parts.publisher.hold(message, queue, caller, source_label(source))
                break
            except (broker.ReplyRefusedError, broker.ReplyFateUnknownError) as exc:
                if not last and isinstance(exc, broker.ReplyRefusedError):  # deleted: declared again; or full
                    await self._declare(instance, kind)
                    if self._consumers is not None:  # its consumer went with it
                        await self._consumers.forget((instance, kind))
                    continue
                why = str(exc)
            log.warning("hold_failed", instance=instance, reason=why)
            # Not at once: a refusal that lasts must not spend the request's deliveries in a second.
            with contextlib.suppress(ShutdownRequestedError):
                await parts.sleep_unless_stopping(_REFUSED_WAIT_SECONDS)
            await self.settle.give_back(message, "hold_failed")
            return
        await self.settle.ack(message)
        parts.metrics.labelled(parts.metrics.held, instance, reason).inc()
        # Not a line each at info (a backlog is thousands): the hold itself is logged once, the moves counted.
        log.debug("request_held", instance=instance, reason=reason)
        if reason == "busy":
            return
        if reason == "key_rejected":
            self.probe_key(instance)
        await self.follow()

    async def _on_held(self, message: DeliveredMessage, key: HoldKey) -> None:
        """A request from an instance's hold queue: only the worker's own are taken, as from their own queue."""
        instance, _ = key
        properties = message.header.properties
        source = self._sources.get(header_text(message, SOURCE_HEADER))
        if properties.user_id != self.parts.settings.broker_user or source is None:
            # Only the worker publishes there: anything else is a forgery of a caller (x-caller) or a source.
            log.warning("forged_held_request_dropped", instance=instance, user_id=properties.user_id)
            await self.settle.ack(message)
            return
        await self._handle(message, source, True)  # noqa: FBT003 - the handler's third argument is ``held``

    def probe_key(self, instance: str) -> None:
        """Probe ``instance``'s key until Clerk accepts it (one probe per instance), then consume its hold queue."""
        if instance in self._key_probes or self.parts.stopping.is_set():
            return
        log.error("secret_key_rejected", instance=instance, action="holding its requests; probing the key")
        self._key_probes[instance] = asyncio.create_task(self._probe_key(instance))

    async def _probe_key(self, instance: str) -> None:
        parts = self.parts
        try:
            for delay in probe_delays(parts.settings.probe_max_interval_seconds):
                await parts.sleep_unless_stopping(delay)
                upstream = parts.upstreams.get(instance)
                if upstream is None:  # gone from the instances file
                    return
                with contextlib.suppress(UpstreamUnavailableError, InstanceHeldError):
                    await upstream.clerk.probe()
                if upstream.key_ok:
                    break
                parts.metrics.labelled(parts.metrics.key_rejected, instance).inc()
        except ShutdownRequestedError:
            return
        finally:
            self._key_probes.pop(instance, None)
        log.info("secret_key_accepted", instance=instance, action="serving its requests again")
        await self.follow()

    async def close(self) -> None:
        """Stop probing (shutdown)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
