"""The client library: ask the service for sign-in tokens from any asyncio program.

    async with SignInTokenClient("amqp://user:pass@rabbit/") as client:
        try:
            token = await client.create("user_123", expires_in_seconds=300, timeout=5.0)
        except UserNotFoundError as error:
            ...  # error.code, error.message, error.upstream_status, error.clerk_trace_id, ...

One connection, one channel with publisher confirms, any number of calls
at once: each request is published to the default exchange (the lane's
queue as routing key) and its reply matched by ``correlation_id``.

- **Replies** come by direct reply-to (``amq.rabbitmq.reply-to``) by
  default: no queue to declare or clean up, the lowest latency, and nothing
  left behind when the program exits. ``replies="queue"`` uses an exclusive
  queue of the client's own instead, named ``reply_queue_prefix`` and a random
  suffix (a prefix the caller's broker permissions let it declare, and its
  policy's ``reply_to`` lists), or ``amq_`` and one without a prefix. Either
  way a reply exists only while this connection does.
- **Deadlines**: ``timeout`` becomes the request's ``x-deadline``, so a call
  that gave up gets no token created behind its back (one Clerk returns late
  is revoked by the service).
- **Idempotency**: each call has a fresh ``message_id``; pass your own to
  retry a call safely (within the service's idempotency window the retry
  gets the same token, not a second one).
- **Authentic replies**: a reply is taken only when the service's broker user
  published it (``user_id``, which RabbitMQ checks, equal to ``service_user``:
  env ``SERVICE_USER``, else ``sign-in-tokens``), for this client's own user
  (header ``x-caller``), about what the call asked for (the token's
  ``user_id``, and an actor token's ``actor.sub``). Anything else is dropped as forged, logged
  ``forged_reply_dropped`` (never its body), and the call keeps waiting.
- **Errors**: a failed reply raises the ``SignInTokenError`` subclass of its
  code (the service's own error classes), carrying the reply's ``error``
  fields: ``code``, ``message``, ``retryable``, ``upstream_status``,
  ``upstream_code``, ``clerk_trace_id``, ``attempts``. No reply within ``timeout``
  raises ``NoReplyError``. If the connection to the broker is lost while a
  call waits, the reply cannot reach this client any more: the call raises
  ``ConnectionLostError`` at once (never silently hangs); so does a call made
  while the connection is down. Retrying with the same ``message_id`` is
  safe. The connection reconnects by itself (about a second after the broker
  is back).

``impersonate`` asks for an actor token (Clerk's impersonation: the session it opens names the
impersonator in its ``act`` claim) on IMPERSONATION_QUEUE, under the same rules;
``revoke_actor_token`` revokes one.

The lower-level ``send`` and ``request`` return the raw and the typed reply
without raising on a failed one (the demo and the tests use them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError

from sign_in_tokens_client import tracing
from sign_in_tokens_client import wire as amqp_wire
from sign_in_tokens_client.connection import (
    CHANNEL_FAILURES,
    DIRECT_REPLY_TO,
    INSTANCE_HEADER,
    REPLY_KEY_HEADER,
    BrokerUnavailableError,
    broker_user,
    open_connection,
)
from sign_in_tokens_client.contract.errors import (
    ConfigError,
    DeadlineExceededError,
    ForbiddenError,
    InvalidRequestError,
    RateLimitedError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
    UserNotFoundError,
)
from sign_in_tokens_client.contract.errors import RequestError as SignInTokenError
from sign_in_tokens_client.contract.lanes import BULK_QUEUE, IMPERSONATION_QUEUE, REQUEST_QUEUE, REVOKE_QUEUE, Lane
from sign_in_tokens_client.contract.messages import (
    JSON,
    MSGPACK,
    ActorToken,
    Created,
    Kind,
    Reply,
    Revoked,
    SignInToken,
    decode_reply,
    outcome,
)
from sign_in_tokens_client.replies import (
    Accepts,
    ConnectionLostError,
    NoReplyError,
    ReceivedReply,
    for_token,
    for_user,
    forged_because,
    reply_within,
    service_user_from,
    token_or_raise,
)

if TYPE_CHECKING:
    from sign_in_tokens_client.sealing import ReplyOpener

amqp_wire.install()
log = logging.getLogger(__name__)
# How long a call waits for its reply by default (create, request, revoke): its x-deadline too.
DEFAULT_TIMEOUT_SECONDS = 5.0

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "ActorToken",
    "BrokerUnavailableError",
    "ConfigError",
    "ConnectionLostError",
    "DeadlineExceededError",
    "ForbiddenError",
    "InvalidRequestError",
    "Lane",
    "NoReplyError",
    "RateLimitedError",
    "ReceivedReply",
    "SignInToken",
    "SignInTokenClient",
    "SignInTokenError",
    "UpstreamRejectedError",
    "UpstreamUnavailableError",
    "UserNotFoundError",
]


class _Pending(NamedTuple):
    future: asyncio.Future[ReceivedReply]
    accepts: Accepts | None
    message_id: str


class SignInTokenClient:
    """Asks the service for sign-in tokens over one broker connection; use it with ``async with``."""

    def __init__(  # noqa: PLR0913 - keyword-only options, each with its default
        self,
        amqp_url: str,
        *,
        request_queue: str = REQUEST_QUEUE,
        bulk_queue: str = BULK_QUEUE,
        impersonation_queue: str = IMPERSONATION_QUEUE,
        revoke_queue: str = REVOKE_QUEUE,
        replies: Literal["direct", "queue"] = "direct",
        reply_queue_prefix: str | None = None,
        service_user: str | None = None,
        amqp_user: str | None = None,
        name: str = "sign-in-tokens-client",
        instance: str | None = None,
        private_key: bytes | str | None = None,
        service_public_key: bytes | str | Iterable[bytes | str] = (),
    ) -> None:
        """A client of the service's queues (the defaults are the service's); ``connect`` or ``async with``.

        Requests carry this connection's broker user as their ``user_id`` property (RabbitMQ checks
        it): the caller the service's policy and its revocations know. It is the URL's user, or
        ``amqp_user`` (env AMQP_USER) where the URL names none (EXTERNAL or OAuth 2 login).
        ``replies="queue"``: an exclusive queue of the client's own, named ``reply_queue_prefix``
        and a random suffix (a prefix the caller's broker permissions allow it to declare), or
        ``amq_`` and a random suffix (aio-pika's) without one. ``service_user``: see the module's docstring.
        ``instance``: the Clerk instance every request names (``x-clerk-instance``); None: the
        caller's ``default_instance`` in the service's policy, else ``default``.
        ``private_key`` and ``service_public_key`` (32 bytes or base64; the service's keys may be
        several while one rolls): sealed replies (contract v3), opened here; needs the ``sealed``
        extra. Requests name the key's public half (``x-reply-public-key``), which the caller's
        policy lists. A reply that does not open, and an unsealed token, are dropped as forged.
        """
        self._url = amqp_url
        self._queues = {Lane.INTERACTIVE: request_queue, Lane.BULK: bulk_queue}
        self._impersonation_queue = impersonation_queue
        self._revoke_queue = revoke_queue
        self._user_id = broker_user(amqp_url, amqp_user or os.environ.get("AMQP_USER"))
        self._service_user = service_user_from(service_user)
        self._replies = replies
        self._reply_queue_prefix = reply_queue_prefix
        self._name = name
        self._instance = instance
        self._opener: ReplyOpener | None = None
        if private_key is not None:
            from sign_in_tokens_client.sealing import ReplyOpener  # noqa: PLC0415 - the sealed extra

            self._opener = ReplyOpener(private_key, service_public_key)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._pending: dict[str, _Pending] = {}

    async def connect(self) -> None:
        """Connect and listen for replies; BrokerUnavailableError (a ServiceError) says why not."""
        self._connection = await open_connection(self._url, self._name)
        self._connection.close_callbacks.add(self._on_connection_lost)
        channel = await self._connection.channel(publisher_confirms=True)
        self._channel = channel
        if self._replies == "direct":
            await self._consume_direct_replies()
            # The robust channel reopens after a reconnect but knows nothing of this pseudo-queue.
            channel.reopen_callbacks.add(lambda _: self._consume_direct_replies())
        else:
            name = f"{self._reply_queue_prefix}{uuid.uuid4().hex}" if self._reply_queue_prefix else None
            self._reply_queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
            await self._reply_queue.consume(self._on_reply, no_ack=True)

    async def _consume_direct_replies(self) -> None:
        """Consume ``amq.rabbitmq.reply-to`` on the channel (again, once it is reopened)."""
        if self._channel is None:
            return
        self._reply_queue = await self._channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await self._reply_queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        """Close the connection; calls still waiting raise ConnectionLostError."""
        self._fail_pending("the client was closed")
        if self._connection is not None:
            await self._connection.close()

    async def __aenter__(self) -> Self:
        """Connect."""
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        """Close."""
        await self.close()

    @property
    def reply_queue(self) -> str:
        """Where replies come: ``amq.rabbitmq.reply-to``, or the name of the client's own queue."""
        if self._reply_queue is None:
            msg = "SignInTokenClient.connect() was not called"
            raise RuntimeError(msg)
        return self._reply_queue.name

    def _on_connection_lost(self, *_: object) -> None:
        self._fail_pending("the connection to the broker was lost; retry with the same message_id")

    def _forget(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            if not waiting.future.done():
                waiting.future.set_exception(ConnectionLostError(reason))

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        waiting = self._pending.get(correlation_id)
        if waiting is None or waiting.future.done():
            return
        reason = forged_because(message, self._service_user, self._user_id)
        opened = None
        if reason is None and (waiting.accepts is not None or self._opener is not None):
            try:
                reply = opened = self._opened(decode_reply(message.body, message.content_type), message, waiting)
            except msgspec.DecodeError:
                reason = "not a reply the service writes"
            except ValueError as exc:  # SealingError: a box that does not open, or a token in clear
                reason = str(exc)
            else:
                reason = None if waiting.accepts is None or waiting.accepts(reply) else "a token for another request"
        if reason is not None:
            # The call keeps waiting for the service's own reply.
            log.warning(
                "forged_reply_dropped",
                extra={"reason": reason, "correlation_id": correlation_id, "user_id": message.user_id},
            )
            return
        del self._pending[correlation_id]
        waiting.future.set_result(
            ReceivedReply(
                body=message.body,
                content_type=message.content_type,
                correlation_id=message.correlation_id,
                headers=dict(message.headers or {}),
                received_at=time.monotonic(),
                opened=opened if self._opener is not None else None,
            ),
        )

    def _opened(self, reply: Reply, message: AbstractIncomingMessage, waiting: _Pending) -> Reply:
        """The reply, its box opened when this client holds a private key; SealingError when it is forged."""
        if self._opener is None:
            return reply
        return self._opener.open_reply(reply, message, self._user_id, waiting.message_id, self._instance)

    async def create(
        self,
        user_id: str,
        *,
        expires_in_seconds: int | None = None,
        org_id: str | None = None,
        lane: Lane = Lane.INTERACTIVE,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the call's deadline, sent to the service as x-deadline
        message_id: str | None = None,
        msgpack: bool = False,
    ) -> SignInToken:
        """A token for ``user_id``; raises the SignInTokenError of a failed reply, NoReplyError, ConnectionLostError."""
        reply = await self.request(
            user_id,
            expires_in_seconds=expires_in_seconds,
            org_id=org_id,
            lane=lane,
            timeout=timeout,
            message_id=message_id,
            msgpack=msgpack,
        )
        return token_or_raise(reply, Created, SignInToken)

    async def impersonate(
        self,
        user_id: str,
        *,
        actor_sub: str,
        actor: dict[str, str] | None = None,
        expires_in_seconds: int | None = None,
        session_max_duration_in_seconds: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the call's deadline, sent to the service as x-deadline
        message_id: str | None = None,
        msgpack: bool = False,
    ) -> ActorToken:
        """An actor token: ``actor_sub`` (the impersonator's user id) logs in as ``user_id``.

        ``actor``: more keys of the actor object (each must be in the caller's ``actor_keys``);
        both lifetimes default to the caller's maximum in the policy. Raises as ``create`` does.
        """
        reply = await self.request_impersonation(
            user_id,
            actor_sub=actor_sub,
            actor=actor,
            expires_in_seconds=expires_in_seconds,
            session_max_duration_in_seconds=session_max_duration_in_seconds,
            timeout=timeout,
            message_id=message_id,
            msgpack=msgpack,
        )
        return token_or_raise(reply, Created, ActorToken)

    async def request_impersonation(
        self,
        user_id: str,
        *,
        actor_sub: str,
        actor: dict[str, str] | None = None,
        expires_in_seconds: int | None = None,
        session_max_duration_in_seconds: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the call's deadline, sent to the service as x-deadline
        message_id: str | None = None,
        msgpack: bool = False,
    ) -> Reply:
        """Ask for one actor token and return the typed reply, failed or not (``impersonate`` raises instead)."""
        fields: dict[str, Any] = {"user_id": user_id, "actor": {**(actor or {}), "sub": actor_sub}}
        if expires_in_seconds is not None:
            fields["expires_in_seconds"] = expires_in_seconds
        if session_max_duration_in_seconds is not None:
            fields["session_max_duration_in_seconds"] = session_max_duration_in_seconds
        encode = msgspec.msgpack.encode if msgpack else msgspec.json.encode
        with tracing.client_span("sign_in_tokens impersonate"):
            future = await self.send(
                encode(fields),
                queue=self._impersonation_queue,
                content_type=MSGPACK if msgpack else JSON,
                message_id=message_id,
                deadline_ms=_deadline_ms(timeout),
                accepts=for_user(user_id, "actor_token", actor_sub),
            )
            reply = await reply_within(future, timeout)
            tracing.annotate(**{"sign_in_tokens.outcome": outcome(reply)})
            return reply

    async def revoke(
        self,
        sign_in_token_id: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the call's deadline, sent to the service as x-deadline
        message_id: str | None = None,
    ) -> SignInToken:
        """Revoke a sign-in token this caller received; the token, status ``revoked``.

        Only the caller the token was given to may revoke it: anyone else gets ForbiddenError.
        """
        reply = await self._revoke("sign_in_token", sign_in_token_id, timeout, message_id)
        return token_or_raise(reply, Revoked, SignInToken)

    async def revoke_actor_token(
        self,
        actor_token_id: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the call's deadline, sent to the service as x-deadline
        message_id: str | None = None,
    ) -> ActorToken:
        """Revoke an actor token this caller received (an impersonation called off before it was used)."""
        reply = await self._revoke("actor_token", actor_token_id, timeout, message_id)
        return token_or_raise(reply, Revoked, ActorToken)

    async def _revoke(self, kind: Kind, token_id: str, seconds: float, message_id: str | None) -> Reply:
        body = msgspec.json.encode({f"{kind}_id": token_id})
        with tracing.client_span("sign_in_tokens revoke"):
            future = await self.send(
                body,
                queue=self._revoke_queue,
                message_id=message_id,
                deadline_ms=_deadline_ms(seconds),
                accepts=for_token(token_id, kind),
            )
            return await reply_within(future, seconds)

    async def request(
        self,
        user_id: str,
        *,
        expires_in_seconds: int | None = None,
        org_id: str | None = None,
        lane: Lane = Lane.INTERACTIVE,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the call's deadline, sent to the service as x-deadline
        message_id: str | None = None,
        msgpack: bool = False,
    ) -> Reply:
        """Ask for one token and return the typed reply, failed or not (``create`` raises instead)."""
        fields: dict[str, Any] = {"user_id": user_id}
        if expires_in_seconds is not None:
            fields["expires_in_seconds"] = expires_in_seconds
        if org_id is not None:
            fields["org_id"] = org_id
        encode = msgspec.msgpack.encode if msgpack else msgspec.json.encode
        with tracing.client_span("sign_in_tokens create", {"sign_in_tokens.lane": lane.value}):
            future = await self.send(
                encode(fields),
                lane=lane,
                content_type=MSGPACK if msgpack else JSON,
                message_id=message_id,
                deadline_ms=_deadline_ms(timeout),
                accepts=for_user(user_id),
            )
            reply = await reply_within(future, timeout)
            tracing.annotate(**{"sign_in_tokens.outcome": outcome(reply)})
            return reply

    async def send(
        self,
        body: bytes,
        *,
        lane: Lane = Lane.INTERACTIVE,
        queue: str | None = None,
        content_type: str | None = JSON,
        message_id: str | None = None,
        deadline_ms: int | None = None,
        headers: dict[str, Any] | None = None,
        accepts: Accepts | None = None,
    ) -> asyncio.Future[ReceivedReply]:
        """Publish one body (confirmed by the broker) to ``lane``'s queue, or ``queue``; a future of its reply.

        Only an authentic reply resolves it (see the module's docstring), and one ``accepts`` takes.
        """
        if self._channel is None:
            msg = "SignInTokenClient.connect() was not called"
            raise RuntimeError(msg)
        correlation_id = uuid.uuid4().hex
        message_id = message_id or correlation_id
        future: asyncio.Future[ReceivedReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = _Pending(future, accepts, message_id)
        # A call that gave up (its timeout cancels the future) leaves nothing behind.
        future.add_done_callback(lambda done: self._forget(correlation_id) if done.cancelled() else None)
        all_headers = dict(headers or {})
        if self._instance is not None:
            all_headers.setdefault(INSTANCE_HEADER, self._instance)
        if self._opener is not None:
            all_headers.setdefault(REPLY_KEY_HEADER, self._opener.public_key)
        if deadline_ms is not None:
            all_headers["x-deadline"] = deadline_ms
        tracing.inject(all_headers)  # the current span (the call's) goes with the request
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            correlation_id=correlation_id,
            message_id=message_id,
            reply_to=self.reply_queue,
            user_id=self._user_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=all_headers or None,
        )
        try:
            await self._channel.default_exchange.publish(message, queue or self._queues[lane])
        except DeliveryError:
            self._pending.pop(correlation_id, None)
            raise
        except CHANNEL_FAILURES as exc:
            self._pending.pop(correlation_id, None)
            msg = f"the request was not sent: the connection to the broker is down ({type(exc).__name__}); retry"
            raise ConnectionLostError(msg) from None
        except BaseException:
            self._pending.pop(correlation_id, None)
            raise
        return future


def _deadline_ms(timeout: float) -> int:
    """The ``x-deadline`` of a call that waits ``timeout`` seconds."""
    return int((time.time() + timeout) * 1000)
