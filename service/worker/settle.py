"""How a request leaves the worker when it is not answered by a reply: acked, given back, dead-lettered.

And the audit record every outcome needs first: an event the broker never confirms holds the
request back rather than let it be answered unrecorded.
"""

from __future__ import annotations

import contextlib

import structlog
from aiormq.abc import DeliveredMessage
from opentelemetry.trace import SpanKind
from sign_in_tokens_client.connection import CHANNEL_FAILURES
from sign_in_tokens_client.contract.lanes import source_label

from service import tracing
from service.amqp import broker, publisher
from service.amqp.topology import lane_queue_names
from service.clerk.retry import probe_delays
from service.trust.audit import AuditEvent, Event, Subject
from service.worker.parts import Parts

log = structlog.get_logger(__name__)


class Settle:
    """Acknowledge, give back, dead-letter a request; record an audit event."""

    def __init__(self, parts: Parts) -> None:
        """Settle through ``parts`` (its publisher, audit trail, acks)."""
        self.parts = parts
        # Each source's queue, by its label (a held request's dead letter names its lane, not its hold queue).
        self._queues = {source_label(source): name for source, name in lane_queue_names(parts.settings).items()}

    async def ack(self, message: DeliveredMessage) -> None:
        """Acknowledge ``message``: its answer (or dead letter) is confirmed."""
        if not await self.parts.acks.ack(message):
            # The channel is gone: the broker redelivers, and the store answers again.
            log.warning("ack_lost")

    async def give_back(self, message: DeliveredMessage, reason: str) -> None:
        """Give the request back to its queue (the broker does so anyway if the channel died)."""
        log.info("returned_to_queue", reason=reason)
        with contextlib.suppress(*CHANNEL_FAILURES):
            await message.channel.basic_nack(message.delivery_tag or 0, requeue=True)
            self.parts.acks.settled(message)

    async def after_defect(self, message: DeliveredMessage, exc: Exception) -> None:
        """Give back a request the worker failed on; its queue's delivery limit ends a loop in DEAD_LETTER_QUEUE."""
        log.error("unexpected_error", error=exc, exc_info=exc)
        await self.give_back(message, "unexpected_error")

    def _queue_of(self, message: DeliveredMessage, subject: Subject) -> str:
        """The queue a request was published to: its lane's, for one taken from a hold queue (where to requeue it)."""
        taken_from = message.routing_key or ""
        if not self.parts.settings.is_hold_queue(taken_from):
            return taken_from
        return self._queues.get(subject.source_label, taken_from)

    def last_delivery(self, message: DeliveredMessage) -> bool:
        """Whether the queue's delivery limit dead-letters ``message`` if it is returned once more."""
        count = (message.header.properties.headers or {}).get("x-delivery-count", 0)
        return isinstance(count, int) and count >= self.parts.settings.delivery_limit

    async def record(self, event: AuditEvent) -> bool:
        """Publish ``event``, trying MAX_ATTEMPTS times with backoff; whether the broker confirmed it.

        The request waits meanwhile, unacknowledged: a broker that refuses audit events holds
        requests back rather than answering them unrecorded (or burning their delivery limit).
        """
        parts = self.parts
        audit = parts.audit
        delays = probe_delays(parts.settings.retry_max_delay_seconds)
        for attempt in range(1, parts.settings.max_attempts + 1):
            try:
                with tracing.span("audit event", kind=SpanKind.PRODUCER):
                    await audit.record(event)
            except (broker.ReplyRefusedError, broker.ReplyFateUnknownError) as exc:
                parts.metrics.audit_unconfirmed.inc()
                log.warning("audit_event_unconfirmed", audit_event=event.event, attempt=attempt, reason=str(exc))
            else:
                return True
            if attempt < parts.settings.max_attempts:
                await parts.sleep_unless_stopping(next(delays))
                await audit.repair()
        return False

    async def audited(self, message: DeliveredMessage, event: AuditEvent) -> bool:
        """Publish ``event``; False, the request given back to its queue, when the broker never confirmed it."""
        if await self.record(event):
            return True
        await self.give_back(message, "audit_event_unconfirmed")
        return False

    async def dead_letter(
        self,
        message: DeliveredMessage,
        subject: Subject,
        reason: publisher.DeadLetterReason,
        outcome: tuple[Event, str] | None = None,
    ) -> None:
        """Copy the request to DEAD_LETTER_QUEUE, its ``outcome`` audited first when it has none yet."""
        if outcome is not None and not await self.audited(message, subject.event(outcome[0], code=outcome[1])):
            return
        try:
            await self.parts.publisher.dead_letter(message, reason, subject.caller, self._queue_of(message, subject))
        except (broker.ReplyRefusedError, broker.ReplyFateUnknownError):
            log.warning("dead_letter_failed", reason=reason)
            await self.give_back(message, "dead_letter_failed")
            return
        await self.ack(message)
        self.parts.metrics.count(subject.source_label, "dead_lettered", subject.instance)
        log.warning("dead_lettered", reason=reason)
