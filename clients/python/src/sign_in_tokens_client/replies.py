"""What a caller takes from a reply: only the service's, for this caller; a failure as the exception of its code."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage

from sign_in_tokens_client.connection import CALLER_HEADER
from sign_in_tokens_client.contract.errors import (
    BY_CODE,
)
from sign_in_tokens_client.contract.errors import RequestError as SignInTokenError
from sign_in_tokens_client.contract.messages import (
    ActorToken,
    Created,
    ErrorDetail,
    Failed,
    Kind,
    Reply,
    Revoked,
    SignInToken,
    decode_reply,
)

T = TypeVar("T", SignInToken, ActorToken)

# The service's broker user when neither ``service_user`` nor SERVICE_USER says otherwise.
DEFAULT_SERVICE_USER = "sign-in-tokens"


class NoReplyError(TimeoutError):
    """No reply within the call's timeout (its ``x-deadline`` has passed: no token will be created for it)."""


class ConnectionLostError(ConnectionError):
    """The connection to the broker was lost while the call waited; its reply can no longer arrive.

    A retry with the same ``message_id`` is safe: the service answers it from its idempotency store.
    """


@dataclass(frozen=True, slots=True)
class ReceivedReply:
    """A reply as it arrived."""

    body: bytes
    content_type: str | None
    correlation_id: str | None
    headers: dict[str, Any]
    received_at: float
    # A sealed reply opened by the client (its token in clear, in memory only).
    opened: Reply | None = None

    def decode(self) -> Reply:
        """The typed reply (a sealed one opened)."""
        return self.opened if self.opened is not None else decode_reply(self.body, self.content_type)


# Whether a decoded reply answers what the call asked for (a token for the user it named).
Accepts = Callable[[Reply], bool]


def service_user_from(service_user: str | None) -> str:
    """The broker user whose replies are accepted: ``service_user``, else env SERVICE_USER, else the default."""
    return service_user or os.environ.get("SERVICE_USER") or DEFAULT_SERVICE_USER


def forged_because(message: AbstractIncomingMessage, service_user: str, caller: str | None) -> str | None:
    """Why ``message`` is not an authentic reply to ``caller`` from ``service_user``, or None when it is."""
    if message.user_id != service_user:
        return "not published by the service's broker user"
    if (message.headers or {}).get(CALLER_HEADER) != (caller or ""):
        return "a reply for another caller"
    return None


def for_user(user_id: str, kind: Kind = "sign_in_token", actor_sub: str | None = None) -> Accepts:
    """A created reply must carry a token of ``kind`` for ``user_id`` (naming ``actor_sub`` as its actor, if given).

    A failure is taken as it comes.
    """

    def accepts(reply: Reply) -> bool:
        if not isinstance(reply, Created):
            return True
        token = reply.token_object
        if reply.kind != kind or token.user_id != user_id:
            return False
        return actor_sub is None or (isinstance(token, ActorToken) and token.actor.get("sub") == actor_sub)

    return accepts


def for_token(token_id: str, kind: Kind = "sign_in_token") -> Accepts:
    """A revoked reply must carry the token asked for."""
    return lambda reply: not isinstance(reply, Revoked) or (reply.kind == kind and reply.token_object.id == token_id)


async def reply_within(future: asyncio.Future[ReceivedReply], seconds: float) -> Reply:
    """The reply, or NoReplyError after ``seconds``."""
    try:
        received = await asyncio.wait_for(future, seconds)
    except TimeoutError:
        msg = f"no reply within {seconds:g} s; the service does nothing for this request after its deadline"
        raise NoReplyError(msg) from None
    return received.decode()


def error_of(detail: ErrorDetail) -> SignInTokenError:
    """The exception for a failed reply: its code's class (the base for a code this client does not know)."""
    error = BY_CODE.get(detail.code, SignInTokenError)(
        detail.message,
        upstream_status=detail.upstream_status,
        upstream_code=detail.upstream_code,
        clerk_trace_id=detail.clerk_trace_id,
    )
    error.code, error.retryable, error.attempts = detail.code, detail.retryable, detail.attempts
    return error


def token_or_raise(reply: Reply, expected: type[Created | Revoked], kind: type[T]) -> T:
    """The reply's token (a ``kind``), or the SignInTokenError of its code."""
    if isinstance(reply, Failed):
        raise error_of(reply.error)
    token = reply.token_object if isinstance(reply, expected) else None
    if not isinstance(token, kind):
        error = SignInTokenError(f"a {type(reply).__name__} reply to this call")
        error.code = "unexpected_reply"
        raise error
    if isinstance(token.sealed, str):
        error = SignInTokenError("the reply is sealed: give the client private_key= and service_public_key=")
        error.code = "sealed_reply"
        raise error
    return token
