"""What the service reads from a request's AMQP properties and headers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.connection import INSTANCE_HEADER, REPLY_KEY_HEADER
from sign_in_tokens_client.contract.errors import InvalidRequestError

from service.amqp.publisher import held_caller, made_up_message_id, text_of
from service.config import Settings
from service.state.dedup import IdempotencyKey, idempotency_key

# Longer than any instance's name (32) or policy glob: refused without being echoed.
_LONGEST_INSTANCE: Final = 255


@dataclass(frozen=True, slots=True)
class Envelope:
    """A request's addressing: where the reply goes and whose request it is."""

    reply_to: str
    has_reply_to: bool
    correlation_id: str | None
    content_type: str | None
    publisher: str | None
    message_id: str | None
    raw_deadline: object
    raw_instance: object = None
    raw_reply_key: object = None

    @classmethod
    def of(cls, message: DeliveredMessage, settings: Settings, *, held: bool = False) -> Envelope:
        """Read a message's envelope; replies without ``reply_to`` go to RESULTS_QUEUE.

        ``held``: a request the worker moved to a hold queue, its caller in ``x-caller`` (the
        message's ``user_id`` is the worker's, which the hold queue's consumer has checked).
        """
        properties = message.header.properties
        headers = properties.headers or {}
        # A held copy of a request without message_id carries one aiormq made up: not the caller's.
        made_up = held and made_up_message_id(message, settings.broker_user)
        message_id = None if made_up else properties.message_id
        return cls(
            reply_to=properties.reply_to or settings.results_queue,
            has_reply_to=bool(properties.reply_to),
            correlation_id=properties.correlation_id or message_id,
            content_type=properties.content_type,
            publisher=held_caller(message) if held else properties.user_id,
            message_id=message_id,
            raw_deadline=headers.get("x-deadline"),
            raw_instance=headers.get(INSTANCE_HEADER),
            raw_reply_key=headers.get(REPLY_KEY_HEADER),
        )

    def idempotency_key(self, state: str | None) -> IdempotencyKey | None:
        """The key of this request, for the Clerk instance of ``state``, in the idempotency store."""
        return idempotency_key(self.publisher, self.message_id, self.reply_to, state=state)

    def deadline(self) -> float | None:
        """``x-deadline`` as Unix seconds, or None; InvalidRequestError when not an integer."""
        value = self.raw_deadline
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            msg = "header x-deadline must be an integer (Unix epoch milliseconds)"
            raise InvalidRequestError(msg)
        return value / 1000.0

    def instance_named(self) -> str | None:
        """The Clerk instance the request names (``x-clerk-instance``), or None; InvalidRequestError if not text."""
        value = text_of(self.raw_instance)
        if value is None:
            return None
        if not 0 < len(value) <= _LONGEST_INSTANCE:
            msg = (
                f"header {INSTANCE_HEADER} must name a Clerk instance (a string of 1 to {_LONGEST_INSTANCE} characters)"
            )
            raise InvalidRequestError(msg)
        return value

    def reply_key_named(self) -> str | None:
        """The public key the request names for its reply (``x-reply-public-key``), as text, or None."""
        return text_of(self.raw_reply_key)
