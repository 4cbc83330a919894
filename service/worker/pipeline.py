"""One message's life: envelope → who asks → where the reply goes → the operation → audit → reply → ack.

A request is acknowledged only after its audit event and its reply are confirmed by the broker,
or after it has been dead-lettered. Anything that fails before then leaves it unacknowledged (or
returns it to its queue), and the broker delivers it again; the idempotency store answers a
redelivery with the same token.

Each queue the worker consumes runs one operation (``Pipeline.issues``, ``Pipeline.answers``):
creating a sign-in token on the two lanes, an actor token on IMPERSONATION_QUEUE, revoking either
on REVOKE_QUEUE. The worker's own revocation orders
(REVOCATIONS_QUEUE) are carried out by ``revocations.py``. The lifecycle around the pipeline
(start, stop, pauses, the key probe) is ``lifecycle.py``'s.
"""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage
from opentelemetry.trace import SpanKind
from sign_in_tokens_client.contract.errors import ForbiddenError, InvalidRequestError, RequestError
from sign_in_tokens_client.contract.lanes import IMPERSONATE, REVOCATIONS, REVOKE, Lane, Source, source_label
from sign_in_tokens_client.contract.messages import UndecodableError, is_decodable

from service import tracing
from service.amqp.envelope import Envelope
from service.clerk.upstreams import InstanceHeldError
from service.logs import bind_request
from service.trust.audit import Subject
from service.trust.policy import Policy
from service.worker.delivery import Delivery, failed
from service.worker.issuing import Issuing
from service.worker.operations import Answers, Issues
from service.worker.operations.actor_token import CreateActorToken
from service.worker.operations.revoke import RevokeToken
from service.worker.operations.sign_in_token import CreateSignInToken
from service.worker.parts import Parts
from service.worker.revocations import Revocations
from service.worker.settle import Settle


class Pipeline:
    """Answer one request (a create, an impersonation, a revocation), or dead-letter it; KeyRejectedError on a 401."""

    def __init__(self, parts: Parts) -> None:
        """The path's steps, each on ``parts``, and the operation of each queue."""
        self.parts = parts
        self.settle = Settle(parts)
        self.revocations = Revocations(parts, self.settle)
        self.delivery = Delivery(parts, self.settle, self.revocations)
        self.issuing = Issuing(parts, self.delivery, self.revocations)
        # The operation of each queue: one that issues a token, or one answered as it comes.
        create = CreateSignInToken(parts.settings)
        # Each operation reads its own kind of request (Any: the table holds both kinds of operation).
        self.issues: dict[Source, Issues[Any]] = {
            Lane.INTERACTIVE: create,
            Lane.BULK: create,
            IMPERSONATE: CreateActorToken(parts.settings),
        }
        self.answers: dict[Source, Answers] = {REVOKE: RevokeToken(parts, self.revocations)}

    async def handle(self, message: DeliveredMessage, source: Source, *, held: bool = False) -> None:
        """Answer one request; with tracing on, its span continues the caller's trace (``traceparent``).

        ``held``: taken from a Clerk instance's hold queue, on behalf of the caller in ``x-caller``.
        InstanceHeldError when its instance cannot take it now (CLERK_INSTANCES_FILE): it waits in
        the instance's hold queue.
        """
        if not tracing.enabled():
            await self._handle(message, source, held)
            return
        with tracing.span(
            "sign_in_tokens process",
            parent=tracing.extract(message.header.properties.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation": "process",
                "messaging.destination.name": message.routing_key or "",
                "sign_in_tokens.lane": source_label(source),
            },
        ):
            await self._handle(message, source, held)

    async def _handle(self, message: DeliveredMessage, source: Source, held: bool) -> None:  # noqa: FBT001
        if source == REVOCATIONS:
            await self.revocations.carry_out(message)
            return
        envelope = Envelope.of(message, self.parts.settings, held=held)
        bind_request(
            correlation_id=envelope.correlation_id,
            message_id=envelope.message_id,
            publisher=envelope.publisher,
            lane=source_label(source),
        )
        policy = self.parts.policy  # this request's rules, whatever a reload does meanwhile
        # An impersonation or a revocation goes to Clerk as an interactive call, and is audited on that lane.
        lane = source if isinstance(source, Lane) else Lane.INTERACTIVE
        subject = Subject(
            envelope.publisher,
            lane,
            envelope.correlation_id,
            envelope.message_id,
            source=source_label(source),
            kind="actor_token" if source == IMPERSONATE else "sign_in_token",
        )
        if not await self._admitted(message, envelope, subject, policy):
            return
        if self.parts.holding:
            self._check_instance(subject.instance, source, held)
        answers = self.answers.get(source)
        try:
            if answers is None:
                await self.issuing.answer(message, envelope, subject, policy, self.issues[source])
                return
            reply = await answers.answer(message.body, envelope, subject, policy)
        except UndecodableError as exc:
            if not envelope.has_reply_to:
                await self.settle.dead_letter(message, subject, "undecodable", ("failed", InvalidRequestError.code))
                return
            reply = failed(InvalidRequestError(str(exc)))
        except InvalidRequestError as exc:
            reply = failed(exc)
        await self.delivery.deliver(message, envelope, reply, subject)

    def _check_instance(self, instance: str | None, source: Source, held: bool) -> None:  # noqa: FBT001
        """InstanceHeldError when the request's instance is held; or, for a bulk request fresh from its lane, busy.

        Busy: the instance's rate limit has as many bulk requests waiting as its share of the bulk
        lane's prefetch allows; so one instance's bulk backlog never takes the lane from another.
        A request from the hold queue is never moved again for that: it waits for its slot.
        """
        parts = self.parts
        upstream = parts.upstream(instance)
        upstream.check()
        if held or source != Lane.BULK or len(parts.upstreams) == 1:  # busy: only beside another instance
            return
        share = max(1, parts.settings.prefetch // (2 * len(parts.upstreams)))
        if upstream.clerk.limiter.waiting(Lane.BULK) >= share:
            raise InstanceHeldError(upstream.name, "busy")

    async def _admitted(self, message: DeliveredMessage, envelope: Envelope, subject: Subject, policy: Policy) -> bool:
        """Who asks, where the reply goes, which Clerk instance: whether the request goes on (else it is settled)."""
        if not policy.knows(envelope.publisher):
            # A caller with no rules gets nothing, wherever its reply_to points: not even a refusal.
            await self.settle.dead_letter(message, subject, "forbidden_caller", ("refused", "forbidden"))
            return False
        reply_to = envelope.reply_to
        if self.parts.settings.is_own_queue(reply_to) or not policy.reply_allowed(envelope.publisher, reply_to):
            # Nothing goes to a queue the caller may not use (nor to one of the service's), not even a refusal.
            await self.settle.dead_letter(message, subject, "forbidden_reply_to", ("refused", "forbidden"))
            return False
        try:
            subject.instance = policy.instance_for(envelope.publisher, envelope.instance_named(), self.parts.instances)
            subject.reply_key = policy.reply_key(envelope.publisher, envelope.reply_key_named())
            if subject.reply_key is not None and self.parts.sealing.sealer is None:
                msg = "reply_public_key: this worker has no REPLY_SEALING_KEY_FILE to seal replies with"
                raise ForbiddenError(msg)
        except RequestError as exc:  # forbidden, or invalid_request: answered as any refusal is
            if envelope.has_reply_to or is_decodable(
                message.body, envelope.content_type, self.parts.settings.max_body_bytes
            ):
                await self.delivery.deliver(message, envelope, failed(exc), subject)
            else:  # as every request that cannot be decoded and names no queue for its answer
                await self.settle.dead_letter(message, subject, "undecodable", ("failed", InvalidRequestError.code))
            return False
        return True
