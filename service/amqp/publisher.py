"""Publishing with confirms: replies, dead-letter copies and orders, each confirmed (or refused).

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
import copy
from collections.abc import Awaitable
from typing import Any, Final, Literal, cast

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import DeliveryError
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity
from pamqp import commands as spec
from sign_in_tokens_client import wire as amqp_wire
from sign_in_tokens_client.connection import CALLER_HEADER, CHANNEL_FAILURES, INSTANCE_HEADER
from sign_in_tokens_client.sealing import NACL_BOX, SEALED_HEADER

from service import tracing
from service.amqp.broker import (
    BLOCKED_POLL_SECONDS,
    ReplyFateUnknownError,
    ReplyRefusedError,
    is_blocked,
    is_direct_reply_to,
)

log = structlog.get_logger(__name__)

# Why the worker copies a request to DEAD_LETTER_QUEUE: its ``x-dead-letter-reason`` header.
DeadLetterReason = Literal["undecodable", "reply_refused", "forbidden_reply_to", "forbidden_caller"]


_PERSISTENT: Final = int(aio_pika.DeliveryMode.PERSISTENT)


def reply_properties(
    *,
    content_type: str,
    correlation_id: str | None,
    outcome: str,
    service_user: str,
    caller: str | None,
    sealed_for: str | None = None,
) -> spec.Basic.Properties:
    """A reply's properties as the contract shapes them: persistent, ``x-outcome`` and ``x-caller`` headers.

    ``sealed_for``: a sealed reply's Clerk instance, which its box is bound to: headers ``x-sealed:
    nacl-box`` and ``x-clerk-instance``.

    ``user_id`` is the worker's own broker user (RabbitMQ refuses a publish whose ``user_id`` is
    not its connection's, so no caller can forge a reply); ``x-caller`` the requester's validated
    ``user_id`` (empty when it has none), so a reply moved into another caller's queue is told apart.
    Built directly (an ``aio_pika.Message`` would check and convert each attribute again per reply).
    """
    headers: dict[str, Any] = {"x-outcome": outcome, CALLER_HEADER: caller or ""}
    if sealed_for is not None:
        headers[SEALED_HEADER] = NACL_BOX
        headers[INSTANCE_HEADER] = sealed_for
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


# On a request the worker moved to a Clerk instance's hold queue: the queue it was taken from, and
# whether it had no message_id (aiormq gives the copy one, to match a return to its publish).
SOURCE_HEADER: Final = "x-source"
NO_MESSAGE_ID_HEADER: Final = "x-no-message-id"


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
        NO_MESSAGE_ID_HEADER,
    }
)


_BROKER_DEATH_HEADERS: Final = ("x-first-death-", "x-last-death-")


def _callers_headers(properties: spec.Basic.Properties) -> dict[str, Any]:
    """A request's headers without any the service or RabbitMQ writes: a caller's word for none of them."""
    return {
        name: value
        for name, value in (properties.headers or {}).items()
        if name not in _SERVICE_HEADERS and not name.startswith(_BROKER_DEATH_HEADERS)
    }


def text_of(value: object) -> str | None:
    """A header's value as text: None when absent, a byte array (as some clients send text) decoded; else ""."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return ""
    return ""


def header_text(message: DeliveredMessage, name: str) -> str:
    """A header the worker wrote, as text ("" when absent)."""
    return text_of((message.header.properties.headers or {}).get(name)) or ""


def held_caller(message: DeliveredMessage) -> str | None:
    """The caller of a request the worker moved to a hold queue (``x-caller``; empty: nameless)."""
    return header_text(message, CALLER_HEADER) or None


def made_up_message_id(message: DeliveredMessage, service_user: str) -> bool:
    """Whether ``message`` is a held copy whose ``message_id`` aiormq made up (its request had none).

    Only a copy the service published says so (its ``user_id``, which RabbitMQ checks): a caller's
    own header is not its word for that.
    """
    properties = message.header.properties
    return properties.user_id == service_user and (properties.headers or {}).get(NO_MESSAGE_ID_HEADER) is True


def _service_copy(message: DeliveredMessage, service_user: str, written: dict[str, Any]) -> spec.Basic.Properties:
    """A request's own properties, persistent, published by the service: its caller's headers and ``written``.

    The copy carries the service's ``user_id``: no header on it may be the caller's word for what
    the service or RabbitMQ says (``_callers_headers`` leaves those out).
    """
    properties = copy.copy(message.header.properties)
    properties.headers = {**_callers_headers(properties), **written}
    properties.user_id = service_user
    properties.delivery_mode = aio_pika.DeliveryMode.PERSISTENT
    return properties


def _copy_for_hold(
    message: DeliveredMessage, caller: str | None, source: str, service_user: str
) -> spec.Basic.Properties:
    """A request's own properties, persistent, published by the service for ``caller``, from ``source``.

    ``expiration`` kept: a request its caller let expire is dead-lettered from the hold queue as from its lane.
    """
    written: dict[str, Any] = {CALLER_HEADER: caller or "", SOURCE_HEADER: source}
    if message.header.properties.message_id is None or made_up_message_id(message, service_user):
        written[NO_MESSAGE_ID_HEADER] = True  # held again: still none of the caller's
    return _service_copy(message, service_user, written)


def _copy_for_dead_letter(
    message: DeliveredMessage, reason: str, service_user: str, caller: str | None, queue: str
) -> spec.Basic.Properties:
    """The request's own properties, persistent, with why it was dead-lettered in headers.

    The user_id property must match the publishing connection's user (the worker's, which the copy
    carries), so the original publisher travels as a header instead (empty when nameless): a
    nameless caller cannot name another as ``x-original-user-id``.
    """
    written: dict[str, Any] = {
        "x-dead-letter-reason": reason,
        "x-original-routing-key": queue,
        "x-original-user-id": caller or "",
    }
    expiration = message.header.properties.expiration
    if expiration:  # as RabbitMQ's own dead-lettering does: a copy must not expire in the dead-letter queue
        written["x-original-expiration"] = expiration
    properties = _service_copy(message, service_user, written)
    if expiration:
        properties.expiration = None
    if properties.message_id is None or made_up_message_id(message, service_user):
        properties.message_id = _AbsentMessageId()
    return properties


class _PassiveDeclare(spec.Queue.Declare):
    """A passive ``queue.declare`` of any name RabbitMQ accepts.

    pamqp checks queue names against a pattern narrower than RabbitMQ's
    (direct reply-to names hold ``/``, ``+`` and ``=``).
    """

    def validate(self) -> None:
        """Leave names to the broker."""


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

    async def dead_letter(
        self, message: DeliveredMessage, reason: DeadLetterReason, caller: str | None, queue: str
    ) -> None:
        """Copy ``caller``'s request, from ``queue``, to DEAD_LETTER_QUEUE with the reason; raise as ``publish``."""
        await self._require_queue(self._dead_letter_queue)
        properties = _copy_for_dead_letter(message, reason, self.service_user, caller, queue)
        await self._publish(message.body, self._dead_letter_queue, properties, mandatory=False)

    async def hold(self, message: DeliveredMessage, queue: str, caller: str | None, source: str) -> None:
        """Copy ``caller``'s request, taken from ``source``, to a hold ``queue``; raise as ``publish``."""
        properties = _copy_for_hold(message, caller, source, self.service_user)
        await self._publish(message.body, queue, properties, mandatory=True)

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

        One timer looks every ``BLOCKED_POLL_SECONDS`` while the confirm is
        slow; no task is made for the usual, fast confirm. A nack or a return
        is raised by aiormq as DeliveryError.
        """
        loop = asyncio.get_running_loop()
        step = min(BLOCKED_POLL_SECONDS, self._confirm_timeout)
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
