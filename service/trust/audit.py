"""The audit trail: an event on AUDIT_EXCHANGE for every outcome, never the token or its URL.

Each request's outcome (``created``, ``refused``, ``failed``) is published,
with a publisher confirm, before its reply; the request is acknowledged
only after both are confirmed, so a token never reaches a caller without a
confirmed record of who got it. A token the service revoked (nobody could
receive it, or Clerk answered after the deadline) is a ``revoked`` event.
Routing key ``EVENT.LANE``; the exchange is a durable topic exchange the
worker declares. Delivery is at least once: a request redelivered after a
crash is recorded again, with the same ``message_id``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import aio_pika
import msgspec
from aio_pika.abc import AbstractRobustConnection
from pamqp import commands as spec
from sign_in_tokens_client.connection import CHANNEL_FAILURES
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import (
    CreateActorTokenRequestBody,
    CreateSignInTokenRequestBody,
    Failed,
    Kind,
    Reply,
    outcome,
)
from sign_in_tokens_client.wire import printable

from service import tracing
from service.amqp.broker import ReplyRefusedError
from service.amqp.publisher import ReplyPublisher
from service.amqp.topology import declare_audit_exchange
from service.config import Settings

Event = Literal["created", "refused", "failed", "revoked"]
# The codes of requests the policy turned away: ``refused``, not ``failed``.
_REFUSALS: Final = frozenset({"forbidden"})


class AuditEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One event, as contracts v2 and v3 lay it out (every field present, null when unknown).

    ``kind``: ``sign_in_token`` or ``actor_token``; an impersonation names its ``actor`` (not a
    secret) and its ``actor_sub``, and its token's id is ``actor_token_id``. ``instance``: the Clerk
    instance the request went to (null when it was refused before one was chosen).
    """

    event: Event
    kind: Kind
    instance: str | None
    caller: str | None
    user_id: str | None
    actor_sub: str | None
    actor: dict[str, str] | None
    org_id: str | None
    sign_in_token_id: str | None
    actor_token_id: str | None
    expires_in_seconds: int | None
    lane: str
    correlation_id: str | None
    message_id: str | None
    code: str | None
    at: str


@dataclass(slots=True)
class Subject:
    """Whose request, for what: filled in as the request is read, then admitted."""

    caller: str | None
    lane: Lane
    correlation_id: str | None
    message_id: str | None
    user_id: str | None = None
    org_id: str | None = None
    expires_in_seconds: int | None = None
    # The queue it came from, as metrics name it: ``impersonate`` or ``revoke`` (audited on ``lane``).
    source: str | None = None
    # The kind of token it is about, and for an impersonation its actor.
    kind: Kind = "sign_in_token"
    actor: dict[str, str] | None = None
    # The Clerk instance it goes to, once chosen (an order of an earlier version names none: it is ``default``'s).
    instance: str | None = None
    # The caller's public key its reply is sealed to (the policy's ``reply_public_key``), or None: in clear.
    reply_key: bytes | None = None

    @property
    def source_label(self) -> str:
        """The lane label of its metrics: ``interactive``, ``bulk``, ``impersonate`` or ``revoke``."""
        return self.source or self.lane.value

    def asks_for(self, request: CreateSignInTokenRequestBody | CreateActorTokenRequestBody) -> None:
        """Record what the request asks for (after decoding, and again once the policy filled it in)."""
        self.user_id = request.user_id
        self.expires_in_seconds = request.expires_in_seconds
        if isinstance(request, CreateActorTokenRequestBody):
            self.kind, self.actor = "actor_token", request.actor
        else:
            self.org_id = request.org_id

    def event(self, event: Event, *, code: str | None = None, token_id: str | None = None) -> AuditEvent:
        """The event about this request (and ``token_id``, of its kind), stamped now."""
        actor = self.kind == "actor_token"
        return AuditEvent(
            event=event,
            kind=self.kind,
            instance=self.instance,
            caller=_text(self.caller),
            user_id=self.user_id,
            actor_sub=self.actor.get("sub") if self.actor else None,
            actor=self.actor,
            org_id=self.org_id,
            sign_in_token_id=None if actor else token_id,
            actor_token_id=token_id if actor else None,
            expires_in_seconds=self.expires_in_seconds,
            lane=self.lane.value,
            correlation_id=_text(self.correlation_id),
            message_id=_text(self.message_id),
            code=code,
            at=_now(),
        )


class RevocationOrder(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token made that nobody holds: revoke it at Clerk, then record it (REVOCATIONS_QUEUE, the worker's own).

    The token's kind is its ``subject``'s (a sign-in token in an order without one: earlier
    versions'); its id keeps the name earlier versions' orders give it. ``subject``'s text fields
    are printable (UTF-8): the order is JSON.
    """

    token_id: str = msgspec.field(name="sign_in_token_id")
    reason: str
    subject: Subject


_order_encoder = msgspec.json.Encoder()
_order_decoder = msgspec.json.Decoder(RevocationOrder)


def revocation_order(token_id: str, reason: str, subject: Subject) -> bytes:
    """The order to revoke ``token_id``, encoded."""
    printable_subject = replace(
        subject,
        caller=_text(subject.caller),
        correlation_id=_text(subject.correlation_id),
        message_id=_text(subject.message_id),
        source=None,
    )
    return _order_encoder.encode(RevocationOrder(token_id, reason, printable_subject))


def read_revocation_order(body: bytes) -> RevocationOrder:
    """An order ``revocation_order`` wrote (msgspec.DecodeError otherwise)."""
    return _order_decoder.decode(body)


def outcome_event(reply: Reply) -> tuple[Event, str | None, str | None]:
    """The event of a reply: ``(event, code, token_id)``."""
    if not isinstance(reply, Failed):
        return outcome(reply), None, reply.token_object.id
    code = reply.error.code
    return ("refused" if code in _REFUSALS else "failed"), code, None


def _text(value: str | None) -> str | None:
    r"""A property as JSON can carry it: octets that were not UTF-8 escaped (``\xff``)."""
    return None if value is None else printable(value)


def _now() -> str:
    """UTC, milliseconds, ``Z``: ``2026-11-23T16:00:00.123Z``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_encoder = msgspec.json.Encoder()
_PERSISTENT: Final = int(aio_pika.DeliveryMode.PERSISTENT)


class AuditTrail:
    """Publishes events to the audit exchange, confirmed, on the reply publisher's channel."""

    def __init__(self, connection: AbstractRobustConnection, publisher: ReplyPublisher, settings: Settings) -> None:
        """Publish through ``publisher`` to AUDIT_EXCHANGE (declared again over ``connection`` when it fails)."""
        self._connection = connection
        self._publisher = publisher
        self._settings = settings
        self._exchange = settings.audit_exchange
        # Whether the last event reached a queue (readiness: ``audit_routed``); true until one is returned.
        self.routed = True

    async def record(self, event: AuditEvent) -> None:
        """Publish ``event``; return once a queue has it and the broker confirmed it, else raise.

        Raises as ``ReplyPublisher.publish``: ReplyRefusedError when the event was returned (no
        queue is bound to take it: it is not a record) or nacked.
        """
        headers: dict[str, Any] = {}
        tracing.inject(headers)
        properties = spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=_PERSISTENT,
            headers=headers or None,
            message_id=uuid.uuid4().hex,  # a return is matched to its publish by it
            user_id=self._publisher.service_user,
        )
        try:
            await self._publisher.publish_event(
                self._exchange, f"{event.event}.{event.lane}", _encoder.encode(event), properties
            )
        except ReplyRefusedError:
            self.routed = False
            raise
        self.routed = True

    async def repair(self) -> None:
        """After a failed publish: declare the exchange and its archive again (an operator may have deleted them)."""
        with contextlib.suppress(*CHANNEL_FAILURES, RuntimeError):
            await declare_audit_exchange(self._connection, self._settings)
