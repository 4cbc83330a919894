"""Tokens nobody holds are revoked: a durable order on REVOCATIONS_QUEUE, carried out by any worker.

An order outlives the process and the request that made it: the worker that takes it revokes the
token at Clerk and acknowledges the order only then (a stop, a rejected key or an outage returns
it to its queue), and records the ``revoked`` event.
"""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec
import structlog
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from sign_in_tokens_client.connection import DEFAULT_INSTANCE
from sign_in_tokens_client.contract.errors import RequestError, ServiceError, UpstreamRejectedError, UserNotFoundError
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import JSON, Created, Token

from service.amqp import broker
from service.logs import bind, token_field
from service.state.dedup import IdempotencyStore
from service.state.dedup.memory import MemoryIdempotencyStore
from service.trust.audit import Subject, read_revocation_order, revocation_order
from service.worker.parts import Parts
from service.worker.settle import Settle

log = structlog.get_logger(__name__)

_PERSISTENT: Final = 2
# Waits before an order to revoke is published again (about 1.5 s in all), then the token is revoked at once.
_ORDER_RETRY_SECONDS: Final = (0.1, 0.2, 0.4, 0.8)


class Revocations:
    """Order the revocation of a token nobody holds; carry out an order; revoke at Clerk."""

    def __init__(self, parts: Parts, settle: Settle) -> None:
        """Revoke through ``parts`` (Clerk, the publisher), recording through ``settle``."""
        self.parts = parts
        self.settle = settle

    async def order(self, token_id: str, subject: Subject, reason: str) -> None:
        """Order the revocation of a token nobody holds: a message on REVOCATIONS_QUEUE, confirmed.

        The token is of ``subject``'s kind. If the broker will not take the order, the token is
        revoked here at once instead.
        """
        named = token_field(subject.kind, token_id)
        settings = self.parts.settings
        properties = spec.Basic.Properties(
            content_type=JSON, delivery_mode=_PERSISTENT, message_id=token_id, user_id=settings.broker_user
        )
        body = revocation_order(token_id, reason, subject)
        for wait in (*_ORDER_RETRY_SECONDS, None):
            try:
                await self.parts.publisher.publish(body, properties, settings.revocations_queue)
            except (broker.ReplyRefusedError, broker.ReplyFateUnknownError) as exc:
                if wait is None:
                    log.warning("revocation_not_ordered", reason=str(exc), **named)
                    await self.now(token_id, subject)
                    return
                # A channel reopening (an error closed it, the connection came back): at a stop too.
                await asyncio.sleep(wait)
            else:
                log.info("revocation_ordered", reason=reason, **named)
                return

    async def now(self, token_id: str, subject: Subject) -> None:
        """Revoke a token at Clerk and record it; a failure is logged and counted, not raised."""
        try:
            await self.at_clerk(subject, token_id)
        except (ServiceError, asyncio.CancelledError) as exc:
            self.parts.metrics.count_unsettled("revocation_failed")
            log.error(  # noqa: TRY400 - a traceback could carry the token
                "revoke_failed", reason=type(exc).__name__, **token_field(subject.kind, token_id)
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        await self.revoked(token_id, subject)

    async def revoked(self, token_id: str, subject: Subject) -> None:
        """Say and record that the service revoked ``token_id``.

        The event cannot hold anything back (nothing would revoke the token again): one the broker
        never confirms is logged at error, in its place.
        """
        named = token_field(subject.kind, token_id)
        log.warning("token_revoked", **named)
        if not await self.settle.record(subject.event("revoked", token_id=token_id)):
            log.error("audit_event_lost", audit_event="revoked", **named)

    async def carry_out(self, message: DeliveredMessage) -> None:
        """Carry out one order from REVOCATIONS_QUEUE: revoke at Clerk, record, then acknowledge.

        Only the worker's own orders are taken (``user_id``, which RabbitMQ checks, is its broker
        user): anyone may publish to the queue, no one else may order a revocation. A token Clerk
        will not revoke (already used or revoked, or unknown) needs nothing more. A 401 holds the
        order as a request is held; an outage returns it to its queue after a wait; a stop before it
        is sent returns it at once.
        """
        if message.header.properties.user_id != self.parts.settings.broker_user:
            log.warning("forged_revocation_order_dropped", user_id=message.header.properties.user_id)
            await self.settle.ack(message)
            return
        try:
            order = read_revocation_order(message.body)
        except msgspec.DecodeError:
            log.error("revocation_order_unreadable")  # noqa: TRY400 - nothing was raised to show
            await self.settle.ack(message)
            return
        if order.subject.instance is None:  # an order of an earlier version: the one instance there was
            order.subject.instance = DEFAULT_INSTANCE
        if order.subject.instance not in self.parts.upstreams:
            # Its instance is gone from CLERK_INSTANCES_FILE: kept until an operator puts it back.
            log.error(
                "revocation_instance_unknown",
                instance=order.subject.instance,
                **token_field(order.subject.kind, order.token_id),
            )
            await self.parts.sleep_unless_stopping(self.parts.settings.retry_max_delay_seconds)
            await self.settle.give_back(message, "revocation_instance_unknown")
            return
        bind(reason=order.reason, **token_field(order.subject.kind, order.token_id))
        try:
            await self.at_clerk(order.subject, order.token_id)
        except (UserNotFoundError, UpstreamRejectedError) as exc:
            # Used meanwhile (accepted), revoked already, or unknown to Clerk: no live token is left to revoke.
            log.warning("revocation_needless", upstream_status=exc.upstream_status, upstream_code=exc.upstream_code)
        except RequestError as exc:
            log.warning("revocation_delayed", error=exc.code)
            await self.parts.sleep_unless_stopping(self.parts.settings.retry_max_delay_seconds)
            await self.settle.give_back(message, "revocation_delayed")
            return
        else:
            await self.revoked(order.token_id, order.subject)
        await self.settle.ack(message)

    async def at_clerk(self, subject: Subject, token_id: str) -> Token:
        """Revoke ``token_id`` (of ``subject``'s kind, at its instance), retrying transient failures.

        A stop returns its order or request.
        """
        parts = self.parts
        upstream = parts.upstream(subject.instance)
        if parts.holding:
            upstream.check()
        clerk = upstream.clerk

        async def attempt() -> Token:
            return await clerk.revoke(subject.kind, token_id)

        token, _ = await parts.retry.run(attempt, deadline=None, sleep=parts.sleep_unless_stopping)
        parts.metrics.revoked.inc()
        return token

    async def settle_in_process_answers(self, store: IdempotencyStore) -> None:
        """At a stop, the in-process store's undelivered tokens die with it: revoke the unpublished, count the rest.

        Their requests go back to their queues, and the next worker answers them with new tokens.
        With REDIS_URL nothing is to do: an unsettled answer outlives the process, and the
        redelivery sends it.
        """
        if not isinstance(store, MemoryIdempotencyStore) or self.parts.publisher_or_none is None:
            return
        for left in store.unsettled():
            reply = left.remembered.reply
            if not isinstance(reply, Created):
                continue
            token_id = reply.token_object.id
            if left.published:
                # Its reply was published and its confirm lost: the caller may hold it.
                self.parts.metrics.count_unsettled("fate_unknown_at_stop")
                log.warning("token_fate_unknown", reason="fate_unknown_at_stop", **token_field(reply.kind, token_id))
                continue
            store.forget(left.key)
            subject = left.context
            if not isinstance(subject, Subject):
                subject = Subject(left.key[0] or None, Lane.INTERACTIVE, None, left.key[1], kind=reply.kind)
            await self.order(token_id, subject, "stopped_before_delivery")
