"""A reply's way out: recorded, granted, published, its fate settled under its key, then acked.

Each step is confirmed before the next; a reply nobody can receive gets its token revoked (unless a
copy of the request delivered it) and its request dead-lettered.
"""

from __future__ import annotations

import structlog
from aiormq.abc import DeliveredMessage
from opentelemetry.trace import SpanKind
from sign_in_tokens_client.contract.errors import RequestError
from sign_in_tokens_client.contract.messages import (
    Created,
    ErrorDetail,
    Failed,
    Reply,
    Revoked,
    encode_reply,
    outcome,
    reply_content_type,
)

from service import tracing
from service.amqp import broker, publisher
from service.amqp.envelope import Envelope
from service.logs import token_field
from service.state.dedup import NO_CLAIM, Claim, Found
from service.state.redis_link import REDIS_FAILURES
from service.trust.audit import Subject, outcome_event
from service.worker.parts import Parts
from service.worker.revocations import Revocations
from service.worker.settle import Settle

log = structlog.get_logger(__name__)


def failed(error: RequestError) -> Failed:
    """The failed reply for ``error``."""
    return Failed(
        error=ErrorDetail(
            code=error.code,
            message=error.message,
            retryable=error.retryable,
            upstream_status=error.upstream_status,
            upstream_code=error.upstream_code,
            clerk_trace_id=error.clerk_trace_id,
            attempts=error.attempts,
        ),
    )


def outcome_of(reply: Reply) -> str:
    """``created``, ``revoked``, or the error code."""
    return reply.error.code if isinstance(reply, Failed) else outcome(reply)


def reply_log_fields(reply: Reply) -> dict[str, object]:
    """What a ``replied`` line says of a reply: for a failure, everything to quote to Clerk's support."""
    if not isinstance(reply, Failed):
        return {"outcome": outcome(reply), **token_field(reply.kind, reply.token_object.id)}
    error = reply.error
    return {
        "outcome": error.code,
        "message": error.message,
        "upstream_status": error.upstream_status,
        "upstream_code": error.upstream_code,
        "clerk_trace_id": error.clerk_trace_id,
        "attempts": error.attempts,
    }


class Delivery:
    """Deliver a reply to its caller, or settle what follows when nobody can receive it."""

    def __init__(self, parts: Parts, settle: Settle, revocations: Revocations) -> None:
        """Deliver through ``parts``; record and ack through ``settle``; revoke through ``revocations``."""
        self.parts = parts
        self.settle = settle
        self.revocations = revocations

    async def deliver(
        self,
        message: DeliveredMessage,
        envelope: Envelope,
        reply: Reply,
        subject: Subject,
        claim: Claim = NO_CLAIM,
        *,
        mine: bool = False,
    ) -> None:
        """Record the outcome, publish the reply, settle its fate under the claim, ack: each confirmed before the next.

        ``mine``: the reply's token was made for this request (not read from the store).
        """
        parts, settle = self.parts, self.settle
        event, code, token_id = outcome_event(reply)
        if not await settle.record(subject.event(event, code=code, token_id=token_id)):
            if isinstance(reply, Created) and settle.last_delivery(message) and await claim.withdraw():
                # The broker dead-letters it at its next return: its token would reach nobody, unrecorded.
                await self.revocations.order(reply.token_object.id, subject, "unrecorded")
            await settle.give_back(message, "audit_event_unconfirmed")
            return
        content_type = reply_content_type(envelope.content_type)
        sealed = None if isinstance(reply, Failed) else self._sealed(reply, envelope, subject)
        properties = publisher.reply_properties(
            content_type=content_type,
            correlation_id=envelope.correlation_id,
            outcome=outcome(reply),
            service_user=parts.settings.broker_user,
            caller=envelope.publisher,
            sealed_for=subject.instance if sealed is not None else None,
        )
        if isinstance(reply, Created):
            await self._grant(reply.token_object.id, subject)
        if tracing.enabled():
            tracing.annotate(**{"sign_in_tokens.outcome": outcome_of(reply)})
        claim.publishing()
        try:
            with tracing.span("reply publish", kind=SpanKind.PRODUCER):
                await parts.publisher.publish(encode_reply(reply, content_type, sealed), properties, envelope.reply_to)
        except broker.ReplyRefusedError:
            await self._refused(message, envelope, reply, subject, claim, mine=mine)
            return
        except broker.ReplyFateUnknownError:
            # The answer stays stored, unsettled: the redelivery sends the same token again.
            log.warning("reply_fate_unknown", reply_to=envelope.reply_to)
            await settle.give_back(message, "reply_fate_unknown")
            return
        await claim.delivered()
        await settle.ack(message)
        parts.metrics.count(subject.source_label, outcome_of(reply), subject.instance)
        log.info("replied", reply_to=envelope.reply_to, **reply_log_fields(reply))

    def _sealed(self, reply: Created | Revoked, envelope: Envelope, subject: Subject) -> str | None:
        """The box of the reply's token for its caller's key (contract v3), bound to the reply; None: in clear."""
        sealer = self.parts.sealing.sealer
        if subject.reply_key is None or sealer is None:  # the pipeline refused a caller with a key and no sealer
            return None
        token = reply.token_object
        bound = {
            "id": token.id,
            "user_id": token.user_id,
            "caller": envelope.publisher or "",
            "correlation_id": envelope.correlation_id,
            "message_id": envelope.message_id,
            "instance": subject.instance,
        }
        return sealer.seal(subject.reply_key, token.token, token.url, bound)

    async def _grant(self, token_id: str, subject: Subject) -> None:
        """Record who receives the token (before it is sent, so its revocation can follow at once)."""
        try:
            await self.parts.grants.record(
                subject.kind,
                token_id,
                subject.caller,
                subject.expires_in_seconds,
                state=self.parts.state_id(subject.instance),
            )
        except REDIS_FAILURES as exc:
            # The caller gets its token all the same; revoking it through the queue will be refused.
            log.warning("grant_not_recorded", reason=type(exc).__name__, **token_field(subject.kind, token_id))

    async def _refused(
        self,
        message: DeliveredMessage,
        envelope: Envelope,
        reply: Reply,
        subject: Subject,
        claim: Claim,
        *,
        mine: bool,
    ) -> None:
        """Nobody can receive the reply: revoke its token unless a caller may hold it, dead-letter the request.

        A token this request made is withdrawn from the store first: if a copy of the request
        delivered it meanwhile, that caller holds it, and it is left alone. A token read from the
        store was made for another copy: this refusal is not its fate.
        """
        log.warning("reply_refused", reply_to=envelope.reply_to, from_idempotency_store=not mine)
        if isinstance(reply, Created):
            token_id = reply.token_object.id
            if mine and await claim.withdraw():
                await self.revocations.order(token_id, subject, "reply_refused")
            elif mine:
                log.info("token_kept", reason="a copy of this request got it", **token_field(reply.kind, token_id))
            elif claim.found is Found.UNSETTLED:
                # The copy that made it stopped before it knew its reply's fate: it may have arrived.
                self.parts.metrics.count_unsettled("reply_refused_after_unknown_fate")
                log.warning("token_fate_unknown", **token_field(reply.kind, token_id))
        await self.settle.dead_letter(message, subject, "reply_refused")
