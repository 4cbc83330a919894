"""One message's life: decode → policy → dedup → deadline → call Clerk → audit → reply → ack.

A request is acknowledged only after its audit event and its reply are
confirmed by the broker, or after it has been dead-lettered. Anything that fails before then leaves
it unacknowledged (or returns it to its queue), and the broker delivers it
again; the idempotency store answers a redelivery with the same token.

A 401 from Clerk is not a request's failure: the worker stops consuming,
holds that one request as a probe, retries it with backoff, and resumes by
itself when it succeeds. The other requests go back to their queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal

import msgspec
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from opentelemetry.trace import SpanKind
from pamqp import commands as spec

from service import broker, tracing
from service.acks import Acks
from service.audit import (
    AuditEvent,
    AuditTrail,
    Event,
    Subject,
    outcome_event,
    read_revocation_order,
    revocation_order,
)
from service.breaker import OutageHold, UpstreamBreaker
from service.config import SHUTDOWN_MARGIN_SECONDS, Settings
from service.dedup import (
    NO_CLAIM,
    UNRELATED,
    Claim,
    ClaimLostError,
    Found,
    MemoryIdempotencyStore,
    Remembered,
    open_store,
)
from service.envelope import Envelope
from service.errors import (
    ConfigError,
    DeadlineExceededError,
    ForbiddenError,
    InvalidRequestError,
    KeyRejectedError,
    RequestError,
    ServiceError,
    ShutdownRequestedError,
    UpstreamMalformedError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
    UserNotFoundError,
)
from service.grants import CLERK_DEFAULT_LIFETIME_SECONDS, Grants
from service.health import HealthServer, Metrics
from service.lanes import REVOCATIONS, REVOKE, Lane, Source, source_label
from service.logs import bind, bind_request
from service.messages import (
    JSON,
    Created,
    ErrorDetail,
    Failed,
    Reply,
    Revoked,
    SignInToken,
    UndecodableError,
    decode_request,
    decode_revoke,
    encode_clerk_body,
    encode_reply,
    outcome,
    reply_content_type,
)
from service.policy import Policy, policy_from_settings
from service.redis_link import REDIS_FAILURES
from service.retry import RetryPolicy, probe_delays
from service.upstream import ClerkClient

if TYPE_CHECKING:
    from service.redis_link import RedisLink

log = structlog.get_logger(__name__)

# While Redis is away, how often the worker asks it again.
_REDIS_WATCH_SECONDS: Final = 0.5
# How long a link to Redis may stay quiet before the worker asks Redis whether it is there.
_REDIS_IDLE_CHECK_SECONDS: Final = 5.0
_PERSISTENT: Final = 2
# Waits before an order to revoke is published again (about 1.5 s in all), then the token is revoked at once.
_ORDER_RETRY_SECONDS: Final = (0.1, 0.2, 0.4, 0.8)
# What a reply is to its key's answer: the request made it, read it from the store, or neither.
Role = Literal["made", "stored", "other"]


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
        return {"outcome": outcome(reply), "sign_in_token_id": reply.sign_in_token.id}
    error = reply.error
    return {
        "outcome": error.code,
        "message": error.message,
        "upstream_status": error.upstream_status,
        "upstream_code": error.upstream_code,
        "clerk_trace_id": error.clerk_trace_id,
        "attempts": error.attempts,
    }


class Worker:
    """Consumes both lanes, answers each request exactly once while it stays up."""

    def __init__(self, settings: Settings, *, name: str = "sign-in-token-worker") -> None:
        """Build every part; nothing connects until ``start``."""
        self.settings = settings
        self._own_queues = settings.own_queues
        self.name = name
        self.metrics = Metrics()
        self.clerk = ClerkClient(settings, self._observe_upstream, self.metrics.ambiguous_creates.inc)
        self.policy: Policy = policy_from_settings(settings)
        self.dedup = open_store(settings)
        self.grants = Grants(self.dedup.redis, settings.key_id())
        for lane in Lane:
            self.metrics.labelled(self.metrics.rate_limit_waiting, lane.value).set_function(
                functools.partial(self.clerk.limiter.waiting, lane)
            )
        store = self.dedup
        if isinstance(store, MemoryIdempotencyStore):  # Redis's memory is Redis's to report
            self.metrics.idempotency_bytes.set_function(lambda: store.size_bytes)
            self.metrics.idempotency_entries.set_function(lambda: len(store))
        self.retry = RetryPolicy(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_delay_seconds)
        self.acks = Acks()
        self.health = HealthServer(self.metrics, self.readiness, settings.http_host, settings.http_port)
        self.stopping = asyncio.Event()
        self.breaker = UpstreamBreaker(
            threshold=settings.outage_failure_threshold,
            hold_seconds=settings.outage_hold_seconds,
            probe_max_interval_seconds=settings.probe_max_interval_seconds,
            probe=self.clerk.probe,
            on_open=lambda: self._pause("upstream_unavailable"),
            on_close=lambda: self._resume("upstream_unavailable"),
            stopping=self.stopping,
        )
        self._paused: set[str] = set()
        self._lost_at: float | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consumers: broker.LaneConsumers | None = None
        self._publisher: broker.ReplyPublisher | None = None
        self._audit: AuditTrail | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._redis_watch: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the topology, open channels and start consuming."""
        await self.health.start()
        await self.clerk.start()
        links = [link for link in (self.clerk.limiter.redis, self.dedup.redis) if link is not None]
        for link in links:  # first: a certificate that does not verify stops the start (ConfigError)
            await link.check(at_start=True)
        self._connection = await broker.connect(self.settings, self.name)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        await broker.declare_topology(self._connection, self.settings)
        self._publisher = broker.ReplyPublisher(
            self._connection,
            self.settings.dead_letter_queue,
            self.settings.confirm_timeout_seconds,
            self.settings.broker_user,
        )
        await self._publisher.open()
        self._audit = AuditTrail(self._connection, self._publisher, self.settings)
        self._consumers = broker.LaneConsumers(self._connection, self.settings, self._on_message)
        await self._consumers.open()
        if links:
            self._redis_watch = asyncio.create_task(self._watch_redis(links))
            if not all(link.available for link in links):
                await self._pause("redis_unavailable")
        if not self._paused:
            await self._consumers.resume()
        limiter = self.clerk.limiter
        log.info(
            "worker_started",
            http_port=self.health.port,
            prefetch=self.settings.prefetch,
            upstream_concurrency=self.settings.concurrency,
        )
        self._log_policy("policy_in_force")
        if limiter.shared:
            log.info("rate_limit_shared", calls=limiter.limit, window_seconds=limiter.window_seconds)
        else:
            log.warning(
                "rate_limit_in_process",
                calls=limiter.limit,
                window_seconds=limiter.window_seconds,
                assumes="this worker is the only one calling Clerk with this key; set REDIS_URL to share it",
            )

    def _log_policy(self, event: str) -> None:
        file = self.policy.file
        if self.policy.open:
            log.warning(
                "no_policy",
                assumes="anyone who can publish to the request queues may ask for any user's token; set POLICY_FILE",
            )
        elif file is not None:
            log.info(
                event,
                policy_file=self.settings.policy_file,
                callers=len(file.callers),
                defaults=file.defaults is not None,
                anonymous=file.anonymous is not None,
                protected_users=len(file.protected_users),
            )
        if self.policy.refuses_nameless:
            log.warning(
                "nameless_callers_refused",
                reason="the policy has [defaults] but no [anonymous]: requests without a user_id property are "
                "dead-lettered (forbidden_caller)",
            )
        wider = self.policy.wider_when_nameless()
        if wider:
            log.warning(
                "anonymous_wider_than_callers",
                callers=wider,
                reason="[anonymous] allows these listed callers more than their own rules: a request without "
                "user_id gets [anonymous]'s; narrow [anonymous], or take the callers' write permission away",
            )

    def reload_policy(self) -> bool:
        """Read POLICY_FILE again (SIGHUP); a bad file keeps the policy in force and says why.

        Requests already past the policy keep the decision they had; the next ones get the new rules.
        """
        if not self.settings.policy_file:
            log.warning("policy_not_reloaded", reason="POLICY_FILE is not set")
            return False
        try:
            self.policy = policy_from_settings(self.settings)
        except ConfigError as exc:
            log.error("policy_reload_failed", reason=str(exc), action="keeping the policy in force")  # noqa: TRY400
            return False
        self._log_policy("policy_reloaded")
        return True

    def _observe_upstream(self, operation: str, seconds: float) -> None:
        self.metrics.labelled(self.metrics.upstream_latency, operation).observe(seconds)

    def _on_connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        # Called again at each failed reconnect attempt: one line for the loss, one for the return.
        if self._lost_at is None and not self.stopping.is_set():
            self._lost_at = time.monotonic()
            log.warning("broker_connection_lost", reason=type(exc).__name__ if exc else None)

    def _on_reconnected(self, _: object) -> None:
        down = None if self._lost_at is None else round(time.monotonic() - self._lost_at, 1)
        self._lost_at = None
        log.info("broker_reconnected", down_seconds=down)

    @property
    def key_ok(self) -> bool:
        """Whether Clerk's last word on the key accepted it (true until it has said anything)."""
        return self.clerk.key_accepted is not False

    def readiness(self) -> dict[str, bool]:
        """The checks behind /readyz."""
        connection = self._connection
        return {
            "connected": connection is not None and connection.connected.is_set(),
            "broker_unblocked": connection is None or not broker.is_blocked(connection),
            "consuming": self._consumers is not None and self._consumers.consuming,
            "key_ok": self.key_ok,
            "upstream_available": not self.breaker.is_open,
            "rate_limit_available": self.clerk.limiter.available,
            "idempotency_store_available": self.dedup.available,
            "audit_routed": self._audit is None or self._audit.routed,
        }

    async def shutdown(self) -> None:
        """Stop taking requests, finish or return those in flight, close everything.

        No call to Clerk starts any more: a request that has not sent its create goes back to its
        queue at once; one whose create was sent waits for Clerk's answer and delivers it (the
        grace period covers a call: config checks it).
        """
        self.stopping.set()
        self.clerk.stop_sending()
        if self._consumers is not None:
            await self._consumers.pause()
        pending = {t for t in (*self._tasks, self._probe) if t is not None and not t.done()}
        if pending:
            grace = max(0.0, self.settings.shutdown_grace_seconds - SHUTDOWN_MARGIN_SECONDS)
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._settle_in_process_answers()
        await self.breaker.close()
        if self._redis_watch is not None:
            self._redis_watch.cancel()
            await asyncio.gather(self._redis_watch, return_exceptions=True)
        if self._connection is not None:
            # Whatever is still unacknowledged returns to its queue.
            with contextlib.suppress(*broker.CHANNEL_FAILURES):
                await self._connection.close()
        await self.clerk.close()
        await self.dedup.close()
        await self.health.stop()
        if self._connection is not None:
            log.info("worker_stopped")

    async def _settle_in_process_answers(self) -> None:
        """At a stop, the in-process store's undelivered tokens die with it: revoke the unpublished, count the rest.

        Their requests go back to their queues, and the next worker answers them with new tokens.
        With REDIS_URL nothing is to do: an unsettled answer outlives the process, and the
        redelivery sends it.
        """
        store = self.dedup
        if not isinstance(store, MemoryIdempotencyStore) or self._publisher is None:
            return
        for left in store.unsettled():
            reply = left.remembered.reply
            if not isinstance(reply, Created):
                continue
            token_id = reply.sign_in_token.id
            if left.published:
                # Its reply was published and its confirm lost: the caller may hold it.
                self.metrics.count_unsettled("fate_unknown_at_stop")
                log.warning("token_fate_unknown", sign_in_token_id=token_id, reason="fate_unknown_at_stop")
                continue
            store.forget(left.key)
            subject = left.context
            if not isinstance(subject, Subject):
                subject = Subject(left.key[0] or None, Lane.INTERACTIVE, None, left.key[1])
            await self._revoke(token_id, subject, "stopped_before_delivery")

    # -- one message ---------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage, lane: Source) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        in_flight = self.metrics.labelled(self.metrics.in_flight, source_label(lane))
        in_flight.inc()
        try:
            await self.handle(message, lane)
        except KeyRejectedError:
            await self._hold_for_key(message, lane)
        except ShutdownRequestedError:
            await self._return(message, "shutting_down")
        except Exception as exc:  # noqa: BLE001 - a defect must not leave the request stuck
            await self._return_after_defect(message, exc)
        finally:
            in_flight.dec()
            if task is not None:
                self._tasks.discard(task)

    async def _return_after_defect(self, message: DeliveredMessage, exc: Exception) -> None:
        """Return the request; its queue's delivery limit ends a loop in DEAD_LETTER_QUEUE."""
        log.error("unexpected_error", error=exc, exc_info=exc)
        await self._return(message, "unexpected_error")

    async def handle(self, message: DeliveredMessage, source: Source) -> None:
        """Answer one request (a create, or a revocation), or dead-letter it; raise KeyRejectedError on a 401.

        With tracing on, its span continues the caller's trace (``traceparent`` in its headers).
        """
        if not tracing.enabled():
            await self._handle(message, source)
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
            await self._handle(message, source)

    async def _handle(self, message: DeliveredMessage, source: Source) -> None:
        if source == REVOCATIONS:
            await self._settle_revocation(message)
            return
        envelope = Envelope.of(message, self.settings.results_queue)
        bind_request(
            correlation_id=envelope.correlation_id,
            message_id=envelope.message_id,
            publisher=envelope.publisher,
            lane=source_label(source),
        )
        policy = self.policy  # this request's rules, whatever a reload does meanwhile
        # A revocation goes to Clerk as an interactive call, and is audited on that lane.
        lane = source if isinstance(source, Lane) else Lane.INTERACTIVE
        subject = Subject(
            envelope.publisher, lane, envelope.correlation_id, envelope.message_id, source=source_label(source)
        )
        if not policy.knows(envelope.publisher):
            # A caller with no rules gets nothing, wherever its reply_to points: not even a refusal.
            await self._dead_letter(message, subject, "forbidden_caller", ("refused", "forbidden"))
            return
        if envelope.reply_to in self._own_queues or not policy.reply_allowed(envelope.publisher, envelope.reply_to):
            # Nothing goes to a queue the caller may not use (nor to one of the service's), not even a refusal.
            await self._dead_letter(message, subject, "forbidden_reply_to", ("refused", "forbidden"))
            return
        try:
            if source == REVOKE:
                reply = await self._revocation(message, envelope, subject, policy)
            else:
                await self._creation(message, envelope, subject, policy)
                return
        except UndecodableError as exc:
            if not envelope.has_reply_to:
                await self._dead_letter(message, subject, "undecodable", ("failed", InvalidRequestError.code))
                return
            reply = failed(InvalidRequestError(str(exc)))
        except InvalidRequestError as exc:
            reply = failed(exc)
        await self._deliver(message, envelope, reply, subject)

    async def _creation(self, message: DeliveredMessage, envelope: Envelope, subject: Subject, policy: Policy) -> None:
        """Decode a create, admit it, then answer it under its idempotency key (UndecodableError: the body is bad)."""
        with tracing.span("decode"):
            request = decode_request(
                message.body,
                envelope.content_type,
                max_expires_in_seconds=self.settings.max_expires_in_seconds,
                max_body_bytes=self.settings.max_body_bytes,
            )
        bind(user_id=request.user_id)
        subject.asks_for(request)
        try:
            deadline = envelope.deadline()
            with tracing.span("policy"):
                request = policy.admit(envelope.publisher, subject.lane, request)
        except RequestError as exc:
            await self._deliver(message, envelope, failed(exc), subject)
            return
        subject.asks_for(request)
        body = encode_clerk_body(request)
        # A claim lost while this request called Clerk (its lease ran out), the other request's answer not
        # delivered yet: this request's token was revoked, and it claims its key again, once, to wait for it.
        for _ in range(2):
            try:
                async with self.dedup.claim(envelope.idempotency_key, deadline) as claim:
                    try:
                        reply, role = await self._answer_claimed(claim, body, deadline, subject)
                    except ClaimLostError as lost:
                        if lost.answer is None:
                            continue
                        # Delivered already by the request that holds the key: sent again, settled by nobody here.
                        reply, role = self._stored_reply(lost.answer, body)[0], "other"
                    settles = claim if role != "other" else UNRELATED
                    await self._deliver(message, envelope, reply, subject, settles, mine=role == "made")
                    return
            except DeadlineExceededError as exc:  # waiting for the key held elsewhere
                await self._deliver(message, envelope, failed(exc), subject)
                return
        await self._return(message, "idempotency_key_contended")

    async def _revocation(
        self, message: DeliveredMessage, envelope: Envelope, subject: Subject, policy: Policy
    ) -> Reply:
        """Revoke a token for the caller it was given to (UndecodableError, InvalidRequestError: the body is bad)."""
        token_id = decode_revoke(message.body, envelope.content_type, max_body_bytes=self.settings.max_body_bytes)
        bind(sign_in_token_id=token_id)
        envelope.deadline()  # checked as for a create; a revocation is never harmful late, so it is not cut short
        try:
            policy.may_revoke(envelope.publisher)
        except ForbiddenError as exc:
            return failed(exc)
        if not await self.grants.received_by(token_id, envelope.publisher):
            msg = f"sign-in token {token_id!r} was not given to this caller (or its record has expired)"
            return failed(ForbiddenError(msg))
        try:
            token = await self._revoke_at_clerk(token_id)
        except RequestError as exc:
            return failed(exc)
        subject.user_id = token.user_id
        return Revoked(sign_in_token=token)

    def _stored_reply(self, remembered: Remembered, body: bytes) -> tuple[Reply, bool]:
        """The answer the store holds for this key, when it answered this very request; whether it did."""
        if remembered.request != body:
            msg = "message_id was already used for a different request; use a new message_id for each request"
            return failed(InvalidRequestError(msg)), False
        self.metrics.dedup_hits.inc()
        log.info("answered_from_idempotency_store")
        return remembered.reply, True

    async def _answer_claimed(
        self, claim: Claim, body: bytes, deadline: float | None, subject: Subject
    ) -> tuple[Reply, Role]:
        """The reply while this request holds its key, and what it is to the key's answer.

        ``made``: this request made it; ``stored``: the key's answer, sent again; ``other``: neither
        (a refusal of a reused key): its delivery settles nothing under the key.
        ClaimLostError when another request took the key meanwhile (this request's token is revoked).
        """
        if claim.found is Found.SPENT:
            msg = (
                "message_id was answered longer ago than the idempotency window and its token may still be live; "
                "use a new message_id"
            )
            return failed(InvalidRequestError(msg)), "other"
        if claim.remembered is not None:
            reply, same = self._stored_reply(claim.remembered, body)
            return reply, "stored" if same else "other"
        try:
            token = await self._create(body, deadline, subject)
        except RequestError as exc:
            reply = failed(exc)
            if not exc.final:
                return reply, "other"
            await self._remember(claim, body, reply, subject)
            return reply, "made"
        reply = Created(sign_in_token=token)
        await self._remember(claim, body, reply, subject)
        return reply, "made"

    async def _remember(self, claim: Claim, body: bytes, reply: Reply, subject: Subject) -> None:
        """Store the answer under the claim; if the claim was lost, revoke this request's token and raise."""
        lifetime = subject.expires_in_seconds or CLERK_DEFAULT_LIFETIME_SECONDS
        try:
            await claim.remember(body, reply, lifetime, subject)
        except asyncio.CancelledError:
            # Stopped past the grace period while Redis was away: the token was made and cannot be stored.
            if isinstance(reply, Created):
                self.metrics.count_unsettled("stopped_before_stored")
                log.error(  # noqa: TRY400 - a stop, not a defect: no traceback
                    "token_fate_unknown", sign_in_token_id=reply.sign_in_token.id, reason="stopped_before_stored"
                )
            raise
        except ClaimLostError:
            log.warning("idempotency_claim_lost", action="answering with the stored answer; revoking this token")
            if isinstance(reply, Created):
                await self._revoke(reply.sign_in_token.id, subject, "claim_lost")
            raise

    async def _create(self, body: bytes, deadline: float | None, subject: Subject) -> SignInToken:
        """Call Clerk, retrying transient failures; raise the final RequestError."""
        if deadline is not None and time.time() >= deadline:
            msg = "x-deadline passed before the request was processed"
            raise DeadlineExceededError(msg)
        hold = self.breaker.hold()

        async def attempt() -> SignInToken:
            return await self._attempt(body, deadline, subject, hold)

        async def backoff(seconds: float) -> None:
            self.metrics.labelled(self.metrics.retries, subject.source_label).inc()
            await self._sleep_unless_stopping(seconds)

        token, attempts = await self.retry.run(attempt, deadline=deadline, sleep=backoff, on_retry=_log_retry)
        bind(sign_in_token_id=token.id, attempts=attempts)
        if tracing.enabled():
            tracing.annotate(**{"sign_in_tokens.attempts": attempts})
        return token

    async def _attempt(self, body: bytes, deadline: float | None, subject: Subject, hold: OutageHold) -> SignInToken:
        """One attempt: wait out an outage, take a turn, call; a token that comes too late is revoked."""
        await self.breaker.wait_closed(deadline, hold)
        token = await self._call_clerk(body, subject, deadline)
        if deadline is not None and time.time() > deadline:
            await self._revoke(token.id, subject, "after_deadline")
            msg = "Clerk answered after x-deadline; the token was revoked"
            raise DeadlineExceededError(msg, upstream_status=200)
        return token

    async def _call_clerk(self, body: bytes, subject: Subject, deadline: float | None) -> SignInToken:
        """One create at Clerk, its latency measured and its answer told to the breaker."""
        try:
            token = await self.clerk.create(body, subject.lane, deadline)
        except UpstreamMalformedError as exc:
            self.breaker.record_success()  # Clerk answered; it is not down
            if exc.token_id is not None:
                await self._revoke(exc.token_id, subject, "malformed_answer")
            else:  # a token may exist, and nothing names it
                self.metrics.ambiguous_creates.inc()
            raise
        except UpstreamUnavailableError:
            self.breaker.record_unavailable()
            raise
        except RequestError:
            self.breaker.record_success()  # Clerk answered, if only to refuse
            raise
        self.breaker.record_success()
        return token

    async def _deliver(
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
        event, code, token_id = outcome_event(reply)
        if not await self._record(subject.event(event, code=code, sign_in_token_id=token_id)):
            if isinstance(reply, Created) and self._last_delivery(message) and await claim.withdraw():
                # The broker dead-letters it at its next return: its token would reach nobody, unrecorded.
                await self._revoke(reply.sign_in_token.id, subject, "unrecorded")
            await self._return(message, "audit_event_unconfirmed")
            return
        content_type = reply_content_type(envelope.content_type)
        properties = broker.reply_properties(
            content_type=content_type,
            correlation_id=envelope.correlation_id,
            outcome=outcome(reply),
            service_user=self.settings.broker_user,
            caller=envelope.publisher,
        )
        if isinstance(reply, Created):
            await self._grant(reply.sign_in_token.id, subject)
        if tracing.enabled():
            tracing.annotate(**{"sign_in_tokens.outcome": outcome_of(reply)})
        claim.publishing()
        try:
            with tracing.span("reply publish", kind=SpanKind.PRODUCER):
                await self._publisher_or_fail().publish(
                    encode_reply(reply, content_type), properties, envelope.reply_to
                )
        except broker.ReplyRefusedError:
            await self._reply_refused(message, envelope, reply, subject, claim, mine=mine)
            return
        except broker.ReplyFateUnknownError:
            # The answer stays stored, unsettled: the redelivery sends the same token again.
            log.warning("reply_fate_unknown", reply_to=envelope.reply_to)
            await self._return(message, "reply_fate_unknown")
            return
        await claim.delivered()
        await self._ack(message)
        self.metrics.labelled(self.metrics.requests, subject.source_label, outcome_of(reply)).inc()
        log.info("replied", reply_to=envelope.reply_to, **reply_log_fields(reply))

    async def _grant(self, token_id: str, subject: Subject) -> None:
        """Record who receives the token (before it is sent, so its revocation can follow at once)."""
        try:
            await self.grants.record(token_id, subject.caller, subject.expires_in_seconds)
        except REDIS_FAILURES as exc:
            # The caller gets its token all the same; revoking it through the queue will be refused.
            log.warning("grant_not_recorded", sign_in_token_id=token_id, reason=type(exc).__name__)

    def _last_delivery(self, message: DeliveredMessage) -> bool:
        """Whether the queue's delivery limit dead-letters ``message`` if it is returned once more."""
        count = (message.header.properties.headers or {}).get("x-delivery-count", 0)
        return isinstance(count, int) and count >= self.settings.delivery_limit

    async def _audited(self, message: DeliveredMessage, event: AuditEvent) -> bool:
        """Publish ``event``; False, the request given back to its queue, when the broker never confirmed it."""
        if await self._record(event):
            return True
        await self._return(message, "audit_event_unconfirmed")
        return False

    async def _record(self, event: AuditEvent) -> bool:
        """Publish ``event``, trying MAX_ATTEMPTS times with backoff; whether the broker confirmed it.

        The request waits meanwhile, unacknowledged: a broker that refuses audit events holds
        requests back rather than answering them unrecorded (or burning their delivery limit).
        """
        audit = self._audit_or_fail()
        delays = probe_delays(self.settings.retry_max_delay_seconds)
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                with tracing.span("audit event", kind=SpanKind.PRODUCER):
                    await audit.record(event)
            except (broker.ReplyRefusedError, broker.ReplyFateUnknownError) as exc:
                self.metrics.audit_unconfirmed.inc()
                log.warning("audit_event_unconfirmed", audit_event=event.event, attempt=attempt, reason=str(exc))
            else:
                return True
            if attempt < self.settings.max_attempts:
                await self._sleep_unless_stopping(next(delays))
                await audit.repair()
        return False

    async def _reply_refused(
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
            if mine and await claim.withdraw():
                await self._revoke(reply.sign_in_token.id, subject, "reply_refused")
            elif mine:
                log.info("token_kept", sign_in_token_id=reply.sign_in_token.id, reason="a copy of this request got it")
            elif claim.found is Found.UNSETTLED:
                # The copy that made it stopped before it knew its reply's fate: it may have arrived.
                self.metrics.count_unsettled("reply_refused_after_unknown_fate")
                log.warning("token_fate_unknown", sign_in_token_id=reply.sign_in_token.id)
        await self._dead_letter(message, subject, "reply_refused")

    async def _dead_letter(
        self,
        message: DeliveredMessage,
        subject: Subject,
        reason: broker.DeadLetterReason,
        outcome: tuple[Event, str] | None = None,
    ) -> None:
        """Copy the request to DEAD_LETTER_QUEUE, its ``outcome`` audited first when it has none yet."""
        if outcome is not None and not await self._audited(message, subject.event(outcome[0], code=outcome[1])):
            return
        try:
            await self._publisher_or_fail().dead_letter(message, reason)
        except (broker.ReplyRefusedError, broker.ReplyFateUnknownError):
            log.warning("dead_letter_failed", reason=reason)
            await self._return(message, "dead_letter_failed")
            return
        await self._ack(message)
        self.metrics.labelled(self.metrics.requests, subject.source_label, "dead_lettered").inc()
        log.warning("dead_lettered", reason=reason)

    async def _revoke(self, token_id: str, subject: Subject, reason: str) -> None:
        """Order the revocation of a token nobody holds: a message on REVOCATIONS_QUEUE, confirmed.

        The order outlives this process and its request: the worker that takes it revokes the token
        at Clerk and acknowledges it only then (a stop, a rejected key or an outage returns it to its
        queue), and records the ``revoked`` event. If the broker will not take the order, the token
        is revoked here at once instead.
        """
        properties = spec.Basic.Properties(
            content_type=JSON,
            delivery_mode=_PERSISTENT,
            message_id=token_id,
            user_id=self.settings.broker_user,
        )
        body = revocation_order(token_id, reason, subject)
        for wait in (*_ORDER_RETRY_SECONDS, None):
            try:
                await self._publisher_or_fail().publish(body, properties, self.settings.revocations_queue)
            except (broker.ReplyRefusedError, broker.ReplyFateUnknownError) as exc:
                if wait is None:
                    log.warning("revocation_not_ordered", sign_in_token_id=token_id, reason=str(exc))
                    await self._revoke_now(token_id, subject)
                    return
                # A channel reopening (an error closed it, the connection came back): at a stop too.
                await asyncio.sleep(wait)
            else:
                log.info("revocation_ordered", sign_in_token_id=token_id, reason=reason)
                return

    async def _revoke_now(self, token_id: str, subject: Subject) -> None:
        """Revoke a token at Clerk and record it; a failure is logged and counted, not raised."""
        try:
            await self._revoke_at_clerk(token_id)
        except (ServiceError, asyncio.CancelledError) as exc:
            self.metrics.count_unsettled("revocation_failed")
            log.error(  # noqa: TRY400 - a traceback could carry the token
                "revoke_failed", sign_in_token_id=token_id, reason=type(exc).__name__
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        await self._revoked(token_id, subject)

    async def _revoked(self, token_id: str, subject: Subject) -> None:
        """Say and record that the service revoked ``token_id``.

        The event cannot hold anything back (nothing would revoke the token again): one the broker
        never confirms is logged at error, in its place.
        """
        log.warning("token_revoked", sign_in_token_id=token_id)
        if not await self._record(subject.event("revoked", sign_in_token_id=token_id)):
            log.error("audit_event_lost", audit_event="revoked", sign_in_token_id=token_id)

    async def _settle_revocation(self, message: DeliveredMessage) -> None:
        """Carry out one order from REVOCATIONS_QUEUE: revoke at Clerk, record, then acknowledge.

        Only the worker's own orders are taken (``user_id``, which RabbitMQ checks, is its broker
        user): anyone may publish to the queue, no one else may order a revocation. A token Clerk
        will not revoke (already used or revoked, or unknown) needs nothing more. A 401 holds the
        order as a request is held; an outage returns it to its queue after a wait; a stop before it
        is sent returns it at once.
        """
        if message.header.properties.user_id != self.settings.broker_user:
            log.warning("forged_revocation_order_dropped", user_id=message.header.properties.user_id)
            await self._ack(message)
            return
        try:
            order = read_revocation_order(message.body)
        except msgspec.DecodeError:
            log.error("revocation_order_unreadable")  # noqa: TRY400 - nothing was raised to show
            await self._ack(message)
            return
        bind(sign_in_token_id=order.sign_in_token_id, reason=order.reason)
        try:
            await self._revoke_at_clerk(order.sign_in_token_id)
        except (UserNotFoundError, UpstreamRejectedError) as exc:
            # Used meanwhile (accepted), revoked already, or unknown to Clerk: no live token is left to revoke.
            log.warning("revocation_needless", upstream_status=exc.upstream_status, upstream_code=exc.upstream_code)
        except RequestError as exc:
            log.warning("revocation_delayed", error=exc.code)
            await self._sleep_unless_stopping(self.settings.retry_max_delay_seconds)
            await self._return(message, "revocation_delayed")
            return
        else:
            await self._revoked(order.sign_in_token_id, order.subject)
        await self._ack(message)

    async def _revoke_at_clerk(self, token_id: str) -> SignInToken:
        """Revoke ``token_id`` at Clerk, retrying transient failures (a stop returns its order or request)."""

        async def attempt() -> SignInToken:
            return await self.clerk.revoke(token_id)

        token, _ = await self.retry.run(attempt, deadline=None, sleep=self._sleep_unless_stopping)
        self.metrics.revoked.inc()
        return token

    # -- acknowledgements ----------------------------------------------------

    async def _ack(self, message: DeliveredMessage) -> None:
        if not await self.acks.ack(message):
            # The channel is gone: the broker redelivers, and the store answers again.
            log.warning("ack_lost")

    async def _return(self, message: DeliveredMessage, reason: str) -> None:
        """Give the request back to its queue (the broker does so anyway if the channel died)."""
        log.info("returned_to_queue", reason=reason)
        with contextlib.suppress(*broker.CHANNEL_FAILURES):
            await message.channel.basic_nack(message.delivery_tag or 0, requeue=True)
            self.acks.settled(message)

    def _publisher_or_fail(self) -> broker.ReplyPublisher:
        if self._publisher is None:
            msg = "Worker.start() was not called"
            raise RuntimeError(msg)
        return self._publisher

    def _audit_or_fail(self) -> AuditTrail:
        if self._audit is None:
            msg = "Worker.start() was not called"
            raise RuntimeError(msg)
        return self._audit

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        if self.stopping.is_set():
            raise ShutdownRequestedError("shutting down")

    # -- the key -------------------------------------------------------------

    async def _hold_for_key(self, message: DeliveredMessage, lane: Source) -> None:
        self.metrics.key_rejected.inc()
        if self._probe is not None or self.stopping.is_set():
            await self._return(message, "key_rejected")
            return
        # Registered before any await, so concurrent 401s see there is a probe.
        self._probe = asyncio.create_task(self._probe_key(message, lane))
        log.error("secret_key_rejected", action="pausing consumption; holding one request as a probe")
        await self._pause("key_rejected")

    async def _probe_key(self, message: DeliveredMessage, lane: Source) -> None:
        """Probe with backoff until Clerk accepts the key again, then resume.

        The held request is the probe while it is held; once it is answered
        without Clerk's word on the key (its deadline passed, or it came from
        the store) or its hold runs out, a call that creates no token probes.
        """
        held: DeliveredMessage | None = message
        held_since = time.monotonic()
        try:
            for delay in probe_delays(self.settings.probe_max_interval_seconds):
                await self._sleep_unless_stopping(delay)
                if held is None:
                    with contextlib.suppress(UpstreamUnavailableError):
                        await self.clerk.probe()
                else:
                    held = await self._probe_with(held, lane, held_since)
                if self.clerk.key_accepted:
                    break
                self.metrics.key_rejected.inc()
        except ShutdownRequestedError:
            if held is not None:
                await self._return(held, "shutting_down")
            return
        finally:
            self._probe = None
        log.info("secret_key_accepted", action="resuming consumption")
        await self._resume("key_rejected")

    async def _probe_with(
        self,
        message: DeliveredMessage,
        lane: Source,
        held_since: float,
    ) -> DeliveredMessage | None:
        """Try the held request again; return it while it is still held."""
        try:
            await self.handle(message, lane)
        except KeyRejectedError:
            if time.monotonic() - held_since <= self.settings.key_probe_hold_seconds:
                return message
            # Held long enough: return it before the broker's consumer timeout takes the channel.
            await self._return(message, "key_probe_hold_expired")
        except ShutdownRequestedError:
            raise
        except Exception as exc:  # noqa: BLE001 - the probe must go on
            await self._return_after_defect(message, exc)
        return None

    # -- pauses --------------------------------------------------------------

    async def _watch_redis(self, links: list[RedisLink]) -> None:
        """Pause consumption while any link to Redis fails; ask the failed ones until they answer.

        A link with nothing to send is asked too (PING) once it has been quiet for
        ``_REDIS_IDLE_CHECK_SECONDS``: an idle worker notices Redis is gone (not ready, and the
        alert on ``idempotency_store_available``) before a request finds out.
        """
        while not self.stopping.is_set():
            await asyncio.sleep(_REDIS_WATCH_SECONDS)
            for link in links:
                if not link.available or link.idle_for() >= _REDIS_IDLE_CHECK_SECONDS:
                    await link.check()
            if all(link.available for link in links):
                if "redis_unavailable" in self._paused:
                    await self._resume("redis_unavailable")
            elif "redis_unavailable" not in self._paused:
                await self._pause("redis_unavailable")

    async def _pause(self, reason: str) -> None:
        """Stop taking requests for ``reason`` (a rejected key, Clerk unavailable)."""
        self._paused.add(reason)
        if self._consumers is not None:
            await self._consumers.pause()

    async def _resume(self, reason: str) -> None:
        """Take requests again once no reason to pause remains."""
        self._paused.discard(reason)
        if not self._paused and self._consumers is not None and not self.stopping.is_set():
            await self._consumers.resume()


def _log_retry(attempt: int, error: BaseException | None, wait_seconds: float) -> None:
    log.info(
        "retrying_upstream",
        attempt=attempt,
        upstream_status=getattr(error, "upstream_status", None),
        error=getattr(error, "code", type(error).__name__),
        wait_seconds=round(wait_seconds, 3),
    )


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    name: str = "sign-in-token-worker",
    started: Callable[[Worker], object] | None = None,
) -> None:
    """Run a worker until ``stop`` is set, then shut it down within the grace period.

    A stop during start-up (the broker still being retried) ends the start at once.
    ``started`` is told of the worker once it exists (SIGHUP reloads its policy).
    """
    worker = Worker(settings, name=name)
    if started is not None:
        started(worker)
    starting = asyncio.ensure_future(worker.start())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopped
        else:
            log.info("stopped_during_start")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        stopped.cancel()
        await worker.shutdown()
