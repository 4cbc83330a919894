"""The broker: connection, topology, the lane consumers and publish-with-confirm.

One robust connection (aio-pika reconnects and restores channels, queues
and consumers by itself), one channel to consume both lanes, one channel
with publisher confirms to publish replies and dead letters. A publish ends
in one of three ways, and the worker treats each differently:

- confirmed (``Basic.Ack``): the reply is the broker's;
- refused (returned as unroutable, or ``Basic.Nack``): ReplyRefusedError;
- unknown (the connection or channel failed first): ReplyFateUnknownError.

A blocked connection (a broker resource alarm) is not an unknown fate: the
broker holds the message and confirms it when the alarm clears, so the wait
for the confirm goes on for as long as the connection stays blocked.

Two kinds of destination cannot use ``mandatory``. RabbitMQ returns a
mandatory message sent to a direct reply-to name (``amq.rabbitmq.reply-to.*``)
even when it delivered it, and aiormq matches returns to publishes by
``message_id``, inventing one for a message without it. So a reply to a
direct reply-to name, and a dead-lettered copy (which keeps the request's
properties, an absent ``message_id`` included), are sent without
``mandatory`` after a passive declare has shown their queue exists; a
caller that has gone away makes the reply refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Literal, cast

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity, ProbableAuthenticationError
from pamqp import commands as spec
from yarl import URL

from service import amqp_wire, tracing
from service.config import Settings
from service.errors import ConfigError, ServiceError, untrusted_certificate
from service.lanes import REVOCATIONS, REVOKE, Lane, Source, source_label

amqp_wire.install()
log = structlog.get_logger(__name__)

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
# The reply header naming the requester (its validated user_id), which clients check against their own.
CALLER_HEADER: Final = "x-caller"
# How often a slow confirm looks whether the connection is blocked: a block shorter than
# the confirm timeout must not count against it either.
_BLOCKED_POLL_SECONDS: Final = 0.25
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


async def open_connection(url: str, name: str) -> AbstractRobustConnection:
    """Open a robust connection (one attempt); BrokerUnavailableError says why not, without credentials."""
    address = broker_address(url)
    try:
        return await aio_pika.connect_robust(
            url,
            client_properties={"connection_name": name},
            timeout=_CONNECT_TIMEOUT_SECONDS,
            reconnect_interval=_RECONNECT_INTERVAL_SECONDS,
        )
    except ProbableAuthenticationError:
        msg = f"the broker at {address} refused the credentials in AMQP_URL"
        raise BrokerUnavailableError(msg) from None
    except (*CHANNEL_FAILURES, RuntimeError) as exc:
        reason = untrusted_certificate(exc)
        if reason is not None:  # fail closed, at once: waiting will not make the certificate trusted
            msg = f"AMQP_URL: the certificate of the broker at {address} did not verify ({reason}); check cafile"
            raise ConfigError(msg) from None
        msg = f"cannot reach the broker at {address} ({type(exc).__name__})"
        raise BrokerUnavailableError(msg) from None


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """Open the robust connection, retrying with backoff for STARTUP_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + settings.startup_timeout_seconds
    delay = 0.25
    while True:
        try:
            return await open_connection(settings.amqp_url, name)
        except BrokerUnavailableError as exc:
            if time.monotonic() + delay > deadline:
                msg = f"{exc}, for {settings.startup_timeout_seconds:g} s"
                raise BrokerUnavailableError(msg) from None
            log.warning("broker_unreachable", reason=str(exc), retry_in=delay)
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


def lane_queue_names(settings: Settings) -> dict[Source, str]:
    """The queue of each lane, the callers' revocations' and the worker's own orders: what the worker consumes."""
    return {
        Lane.INTERACTIVE: settings.request_queue,
        Lane.BULK: settings.bulk_queue,
        REVOKE: settings.revoke_queue,
        REVOCATIONS: settings.revocations_queue,
    }


async def _declare(
    connection: AbstractRobustConnection,
    kind: str,
    name: str,
    declare: Callable[[AbstractRobustChannel], Awaitable[object]],
) -> None:
    """Declare one queue or exchange on a channel of its own (a refused declare closes its channel)."""
    channel = await connection.channel()
    try:
        await declare(channel)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        # It exists with other arguments (declared by an operator or an older
        # version): use it as it is rather than refuse to start.
        log.warning("exists_with_other_arguments", kind=kind, name=name)
    finally:
        with contextlib.suppress(*CHANNEL_FAILURES):
            await channel.close()


def _queue(name: str, arguments: dict[str, Any]) -> Callable[[AbstractRobustChannel], Awaitable[object]]:
    return lambda channel: channel.declare_queue(name, durable=True, arguments=arguments)


def audit_archive_arguments(settings: Settings) -> dict[str, Any]:
    """The audit archive's arguments: a stream that keeps events AUDIT_ARCHIVE_MAX_AGE."""
    return {"x-queue-type": "stream", "x-max-age": settings.audit_archive_max_age}


async def declare_audit_exchange(connection: AbstractRobustConnection, settings: Settings) -> None:
    """Declare the audit exchange (durable, topic) and, unless turned off, its archive bound to every event.

    Idempotent; called again after an event went unrouted (an operator may have deleted either).
    """
    name = settings.audit_exchange
    await _declare(
        connection,
        "exchange",
        name,
        lambda channel: channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True),
    )
    archive = settings.audit_archive
    if not archive:
        return

    async def declare_and_bind(channel: AbstractRobustChannel) -> None:
        queue = await channel.declare_queue(archive, durable=True, arguments=audit_archive_arguments(settings))
        await queue.bind(name, "#")

    await _declare(connection, "queue", archive, declare_and_bind)


def declared_queues(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every queue the worker declares, with its arguments (deploy/rabbitmq/definitions.json has the same)."""
    quorum = {"x-queue-type": "quorum"}
    found = {settings.dead_letter_queue: quorum, settings.results_queue: quorum}
    requests = {name: lane_queue_arguments(settings) for name in lane_queue_names(settings).values()}
    # An order to revoke is tried until Clerk has revoked the token: no delivery limit, nothing dead-lettered.
    return found | requests | {settings.revocations_queue: quorum}


async def declare_topology(connection: AbstractRobustConnection, settings: Settings) -> None:
    """Declare every queue the service uses, and the audit exchange; idempotent."""
    await declare_audit_exchange(connection, settings)
    for name, arguments in declared_queues(settings).items():
        await _declare(connection, "queue", name, _queue(name, arguments))


OnMessage = Callable[[DeliveredMessage, Source], Coroutine[Any, Any, None]]
# Why the worker copies a request to DEAD_LETTER_QUEUE: its ``x-dead-letter-reason`` header.
DeadLetterReason = Literal["undecodable", "reply_refused", "forbidden_reply_to", "forbidden_caller"]


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


_PERSISTENT: Final = int(aio_pika.DeliveryMode.PERSISTENT)


def reply_properties(
    *, content_type: str, correlation_id: str | None, outcome: str, service_user: str, caller: str | None
) -> spec.Basic.Properties:
    """A reply's properties as the contract shapes them: persistent, ``x-outcome`` and ``x-caller`` headers.

    ``user_id`` is the worker's own broker user (RabbitMQ refuses a publish whose ``user_id`` is
    not its connection's, so no caller can forge a reply); ``x-caller`` the requester's validated
    ``user_id`` (empty when it has none), so a reply moved into another caller's queue is told apart.
    Built directly (an ``aio_pika.Message`` would check and convert each attribute again per reply).
    """
    headers: dict[str, Any] = {"x-outcome": outcome, CALLER_HEADER: caller or ""}
    tracing.inject(headers)  # traceparent and tracestate, when tracing is on
    return spec.Basic.Properties(
        content_type=content_type,
        correlation_id=correlation_id,
        delivery_mode=_PERSISTENT,
        headers=headers,
        user_id=service_user,
    )


class _AbsentMessageId(str):
    """An empty ``message_id`` that aiormq leaves alone and pamqp does not send.

    aiormq gives every publish without a ``message_id`` a random one (it
    matches returns by it); a dead-lettered copy must keep the request's
    properties as they were, absence included.
    """

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


# Headers the service writes on its copies and replies, and RabbitMQ's own dead-lettering headers.
_SERVICE_HEADERS: Final = frozenset(
    {
        "x-delivery-count",
        "x-dead-letter-reason",
        "x-original-routing-key",
        "x-original-user-id",
        "x-original-expiration",
        CALLER_HEADER,
        "x-outcome",
        "x-death",
    }
)
_BROKER_DEATH_HEADERS: Final = ("x-first-death-", "x-last-death-")


def _copy_for_dead_letter(message: DeliveredMessage, reason: str, service_user: str) -> spec.Basic.Properties:
    """The request's own properties, persistent, with why it was dead-lettered in headers."""
    properties = copy.copy(message.header.properties)
    # The copy carries the service's user_id: no header on it may be the caller's word for what the
    # service or RabbitMQ says (a nameless caller naming another as x-original-user-id).
    headers = {
        name: value
        for name, value in (properties.headers or {}).items()
        if name not in _SERVICE_HEADERS and not name.startswith(_BROKER_DEATH_HEADERS)
    }
    headers["x-dead-letter-reason"] = reason
    headers["x-original-routing-key"] = message.routing_key or ""
    # The user_id property must match the publishing connection's user (the worker's, which the
    # copy carries), so the original publisher travels as a header instead: empty when nameless.
    headers["x-original-user-id"] = properties.user_id or ""
    properties.user_id = service_user
    if properties.expiration:
        # As RabbitMQ's own dead-lettering does: a copy must not expire in the dead-letter queue.
        headers["x-original-expiration"] = properties.expiration
        properties.expiration = None
    properties.headers = headers
    properties.delivery_mode = aio_pika.DeliveryMode.PERSISTENT
    if properties.message_id is None:
        properties.message_id = _AbsentMessageId()
    return properties


def is_direct_reply_to(name: str) -> bool:
    """Whether ``name`` is a direct reply-to pseudo-queue."""
    return name.startswith(DIRECT_REPLY_TO)


class _PassiveDeclare(spec.Queue.Declare):
    """A passive ``queue.declare`` of any name RabbitMQ accepts.

    pamqp checks queue names against a pattern narrower than RabbitMQ's
    (direct reply-to names hold ``/``, ``+`` and ``=``).
    """

    def validate(self) -> None:
        """Leave names to the broker."""


def is_blocked(connection: AbstractRobustConnection) -> bool:
    """Whether the broker has blocked the connection (a resource alarm).

    aiormq tracks ``connection.blocked`` / ``unblocked`` in a private event
    (aiormq 7.2, pinned in pyproject.toml) and exposes it only through
    ``ready()``.
    """
    transport = connection.transport
    if transport is None:
        return False
    unblocked = getattr(transport.connection, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


class ReplyPublisher:
    """Publishes replies and dead letters to the default exchange, confirmed."""

    def __init__(
        self, connection: AbstractRobustConnection, dead_letter_queue: str, confirm_timeout: float, service_user: str
    ) -> None:
        """The channel is opened by ``open``; ``service_user``: the broker user it publishes as."""
        self._connection = connection
        self.service_user = service_user
        self._dead_letter_queue = dead_letter_queue
        self._confirm_timeout = confirm_timeout
        self._channel: AbstractRobustChannel | None = None
        self._queues = QueueChecker(connection, confirm_timeout)

    async def open(self) -> None:
        """Open the confirming channel; returned messages raise."""
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def publish(self, body: bytes, properties: spec.Basic.Properties, routing_key: str) -> None:
        """Publish (``mandatory`` where it means something); return once confirmed, or raise."""
        direct = is_direct_reply_to(routing_key)
        if direct:
            await self._require_queue(routing_key)
        await self._publish(body, routing_key, properties, mandatory=not direct)

    async def publish_event(
        self, exchange: str, routing_key: str, body: bytes, properties: spec.Basic.Properties
    ) -> None:
        """Publish to ``exchange``, ``mandatory``: an event no queue receives is returned, ReplyRefusedError.

        ``properties`` carry a ``message_id`` of the event's own: aiormq matches a return to its
        publish by it (RabbitMQ sends ``basic.return`` before the positive confirm).
        """
        await self._publish(body, routing_key, properties, mandatory=True, exchange=exchange)

    async def dead_letter(self, message: DeliveredMessage, reason: DeadLetterReason) -> None:
        """Copy the request to DEAD_LETTER_QUEUE with the reason; raise as ``publish``."""
        await self._require_queue(self._dead_letter_queue)
        properties = _copy_for_dead_letter(message, reason, self.service_user)
        await self._publish(message.body, self._dead_letter_queue, properties, mandatory=False)

    async def _publish(
        self,
        body: bytes,
        routing_key: str,
        properties: spec.Basic.Properties,
        *,
        mandatory: bool,
        exchange: str = "",
    ) -> None:
        if self._channel is None:
            msg = "ReplyPublisher.open() was not called"
            raise RuntimeError(msg)
        try:
            underlay = await self._channel.get_underlay_channel()
            await self._confirmed(
                underlay.basic_publish(
                    body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
                ),
            )
        except DeliveryError:
            # Its text carries the message body: never let it reach a log.
            msg = f"the broker refused the message for {amqp_wire.printable(routing_key)!r}"
            raise ReplyRefusedError(msg) from None
        except (*CHANNEL_FAILURES, RuntimeError) as exc:
            msg = f"no confirm for the message to {amqp_wire.printable(routing_key)!r} ({type(exc).__name__})"
            raise ReplyFateUnknownError(msg) from None

    async def _confirmed(self, publish: Awaitable[object]) -> None:
        """Wait for the confirm, counting only the time the connection is not blocked against ``confirm_timeout``.

        One timer looks every ``_BLOCKED_POLL_SECONDS`` while the confirm is
        slow; no task is made for the usual, fast confirm. A nack or a return
        is raised by aiormq as DeliveryError.
        """
        loop = asyncio.get_running_loop()
        step = min(_BLOCKED_POLL_SECONDS, self._confirm_timeout)
        unblocked_wait = 0.0
        timer: asyncio.TimerHandle | None = None
        async with asyncio.timeout(None) as deadline:

            def tick() -> None:
                nonlocal unblocked_wait, timer
                if is_blocked(self._connection):
                    log.debug("broker_blocked_waiting_for_confirm")
                else:
                    unblocked_wait += step
                if unblocked_wait >= self._confirm_timeout:
                    deadline.reschedule(loop.time())
                else:
                    timer = loop.call_later(step, tick)

            timer = loop.call_later(step, tick)
            try:
                await publish
            finally:
                timer.cancel()  # the one tick() scheduled last

    async def _require_queue(self, name: str) -> None:
        """Raise ReplyRefusedError unless queue ``name`` exists."""
        try:
            exists = await self._queues.exists(name)
        except (*CHANNEL_FAILURES, RuntimeError) as exc:
            msg = f"cannot check queue {amqp_wire.printable(name)!r} ({type(exc).__name__})"
            raise ReplyFateUnknownError(msg) from None
        if not exists:
            msg = f"no queue {amqp_wire.printable(name)!r}"
            raise ReplyRefusedError(msg)


class QueueChecker:
    """Passive declares on a channel of their own, one at a time.

    A declare of a missing queue closes its channel (404), so checks are
    serialised: one refusal never fails another check, and the next check
    opens a new channel. One round trip a check.
    """

    def __init__(self, connection: AbstractRobustConnection, timeout: float) -> None:
        """Check queues over ``connection``; each declare waits ``timeout`` at most."""
        self._connection = connection
        self._timeout = timeout
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def exists(self, name: str) -> bool:
        """Whether queue (or direct reply-to name) ``name`` exists now."""
        frame = _PassiveDeclare(passive=True)
        frame.queue = name
        async with self._lock:
            channel = await self._open()
            try:
                await cast("aiormq.Channel", channel).rpc(frame, timeout=self._timeout)
            except ChannelNotFoundEntity:
                self._channel = None  # the broker closed it
                return False
            except BaseException:
                self._channel = None
                raise
        return True

    async def _open(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            transport = self._connection.transport
            if transport is None:
                msg = "the broker connection is down"
                raise RuntimeError(msg)
            self._channel = await transport.connection.channel()
        return self._channel
