"""One message's life: decode → policy → dedup → deadline → call Clerk → reply → ack.

A request is acknowledged only after its reply is confirmed by the broker,
or after it has been dead-lettered. Anything that fails before then leaves
it unacknowledged (or returns it to its queue), and the broker delivers it
again; the idempotency store answers a redelivery with the same token.

A 401 from Clerk is not a request's failure: the worker stops consuming,
holds that one request as a probe, retries it with backoff, and resumes by
itself when it succeeds. The other requests go back to their queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from service import broker
from service.breaker import UpstreamBreaker
from service.config import Settings
from service.dedup import IdempotencyKey, IdempotencyStore
from service.envelope import Envelope
from service.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    KeyRejectedError,
    RequestError,
    ServiceError,
    UpstreamUnavailableError,
)
from service.health import HealthServer, Metrics
from service.lanes import Lane, LaneGate
from service.messages import (
    Created,
    CreateSignInTokenRequestBody,
    ErrorDetail,
    Failed,
    Reply,
    SignInToken,
    UndecodableError,
    decode_request,
    encode_reply,
    reply_content_type,
)
from service.policy import Policy
from service.retry import RetryPolicy, probe_delays
from service.upstream import ClerkClient

log = structlog.get_logger(__name__)

# Time kept back from the shutdown grace period to close the connection.
_SHUTDOWN_MARGIN_SECONDS: Final = 3.0


class ShutdownRequestedError(ServiceError):
    """The worker is stopping: return the request to its queue."""


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
    """``created``, or the error code."""
    return "created" if isinstance(reply, Created) else reply.error.code


class Worker:
    """Consumes both lanes, answers each request exactly once while it stays up."""

    def __init__(self, settings: Settings, *, name: str = "sign-in-token-worker") -> None:
        """Build every part; nothing connects until ``start``."""
        self.settings = settings
        self.name = name
        self.metrics = Metrics()
        self.clerk = ClerkClient(settings)
        self.policy = Policy(settings.publishers)
        self.dedup = IdempotencyStore(settings.idempotency_window_seconds, settings.idempotency_max_entries)
        self.gate = LaneGate(settings.upstream_concurrency)
        self.retry = RetryPolicy(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_delay_seconds)
        self.health = HealthServer(self.metrics, self.readiness, settings.http_host, settings.http_port)
        self.breaker = UpstreamBreaker(
            threshold=settings.outage_failure_threshold,
            hold_seconds=settings.outage_hold_seconds,
            probe_max_interval_seconds=settings.probe_max_interval_seconds,
            probe=self.clerk.probe,
            on_open=lambda: self._pause("upstream_unavailable"),
            on_close=lambda: self._resume("upstream_unavailable"),
        )
        self._paused: set[str] = set()
        self.stopping = asyncio.Event()
        self.key_ok = True
        self._connection: AbstractRobustConnection | None = None
        self._consumers: broker.LaneConsumers | None = None
        self._publisher: broker.ReplyPublisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the topology, open channels and start consuming."""
        await self.health.start()
        await self.clerk.start()
        self._connection = await broker.connect(self.settings, self.name)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        await broker.declare_topology(self._connection, self.settings)
        self._publisher = broker.ReplyPublisher(self._connection, self.settings.dead_letter_queue)
        await self._publisher.open()
        self._consumers = broker.LaneConsumers(self._connection, self.settings, self._on_message)
        await self._consumers.open()
        await self._consumers.resume()
        log.info("worker_started", http_port=self.health.port, prefetch=self.settings.prefetch)

    def _on_connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        if not self.stopping.is_set():
            log.warning("broker_connection_lost", reason=type(exc).__name__ if exc else None)

    def _on_reconnected(self, _: object) -> None:
        log.info("broker_reconnected")

    def readiness(self) -> dict[str, bool]:
        """The checks behind /readyz."""
        connection = self._connection
        return {
            "connected": connection is not None and connection.connected.is_set(),
            "consuming": self._consumers is not None and self._consumers.consuming,
            "key_ok": self.key_ok,
            "upstream_available": not self.breaker.is_open,
        }

    async def shutdown(self) -> None:
        """Stop taking requests, finish or return those in flight, close everything."""
        self.stopping.set()
        if self._consumers is not None:
            await self._consumers.pause()
        pending = {t for t in (*self._tasks, self._probe) if t is not None and not t.done()}
        if pending:
            grace = max(0.0, self.settings.shutdown_grace_seconds - _SHUTDOWN_MARGIN_SECONDS)
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.breaker.close()
        if self._connection is not None:
            # Whatever is still unacknowledged returns to its queue.
            with contextlib.suppress(*broker.CHANNEL_FAILURES):
                await self._connection.close()
        await self.clerk.close()
        await self.health.stop()
        log.info("worker_stopped")

    # -- one message ---------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage, lane: Lane) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.metrics.in_flight.labels(lane.value).inc()
        try:
            await self.handle(message, lane)
        except KeyRejectedError:
            await self._hold_for_key(message, lane)
        except ShutdownRequestedError:
            await self._return(message)
        except Exception as exc:  # noqa: BLE001 - a defect must not leave the request stuck
            await self._return_after_defect(message, exc)
        finally:
            self.metrics.in_flight.labels(lane.value).dec()
            if task is not None:
                self._tasks.discard(task)

    async def _return_after_defect(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """Return the request; its queue's delivery limit ends a loop in DEAD_LETTER_QUEUE."""
        log.error("unexpected_error", error=exc, exc_info=exc)
        await self._return(message)

    async def handle(self, message: AbstractIncomingMessage, lane: Lane) -> None:
        """Answer one request, or dead-letter it; raise KeyRejectedError on a 401."""
        envelope = Envelope.of(message, self.settings.results_queue)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            correlation_id=envelope.correlation_id,
            message_id=envelope.message_id,
            publisher=envelope.publisher,
            lane=lane.value,
        )
        try:
            request = decode_request(
                message.body,
                envelope.content_type,
                max_expires_in_seconds=self.settings.max_expires_in_seconds,
                max_body_bytes=self.settings.max_body_bytes,
            )
        except UndecodableError as exc:
            if not envelope.has_reply_to:
                await self._dead_letter(message, lane, "undecodable")
                return
            reply: Reply = failed(InvalidRequestError(str(exc)))
        except InvalidRequestError as exc:
            reply = failed(exc)
        else:
            structlog.contextvars.bind_contextvars(user_id=request.user_id)
            reply = await self._answer(request, envelope, lane)
        await self._deliver(message, envelope, reply, lane)

    async def _answer(self, request: CreateSignInTokenRequestBody, envelope: Envelope, lane: Lane) -> Reply:
        try:
            deadline = envelope.deadline()
            self.policy.check(envelope.publisher, request)
        except RequestError as exc:
            return failed(exc)
        key = envelope.idempotency_key
        async with self.dedup.claim(key) as remembered:
            if remembered is not None:
                self.metrics.dedup_hits.inc()
                log.info("answered_from_idempotency_store")
                return remembered
            try:
                token = await self._create(request, deadline, lane)
            except RequestError as exc:
                structlog.contextvars.bind_contextvars(upstream_status=exc.upstream_status, attempts=exc.attempts)
                reply: Reply = failed(exc)
                if exc.final:
                    self.dedup.remember(key, reply)
                return reply
            reply = Created(sign_in_token=token)
            self.dedup.remember(key, reply)
            return reply

    async def _create(self, request: CreateSignInTokenRequestBody, deadline: float | None, lane: Lane) -> SignInToken:
        """Call Clerk, retrying transient failures; raise the final RequestError."""
        if deadline is not None and time.time() >= deadline:
            msg = "x-deadline passed before the request was processed"
            raise DeadlineExceededError(msg)

        async def attempt() -> SignInToken:
            await self.breaker.wait_closed(deadline)
            async with self.gate.turn(lane):
                if deadline is not None and time.time() >= deadline:
                    msg = "x-deadline passed while the request waited for its turn"
                    raise DeadlineExceededError(msg)
                token = await self._call_clerk(request, deadline)
            if deadline is not None and time.time() > deadline:
                await self._revoke(token)
                msg = "Clerk answered after x-deadline; the token was revoked"
                raise DeadlineExceededError(msg, upstream_status=200)
            return token

        async def backoff(seconds: float) -> None:
            self.metrics.retries.labels(lane.value).inc()
            log.info("retrying_upstream", wait_seconds=round(seconds, 3))
            await self._sleep_unless_stopping(seconds)

        token, attempts = await self.retry.run(attempt, deadline=deadline, sleep=backoff)
        structlog.contextvars.bind_contextvars(sign_in_token_id=token.id, attempts=attempts)
        return token

    async def _call_clerk(self, request: CreateSignInTokenRequestBody, deadline: float | None) -> SignInToken:
        """One create at Clerk, its latency measured and its answer told to the breaker."""
        try:
            with self.metrics.upstream_latency.labels("create").time():
                token = await self.clerk.create(request, deadline)
        except UpstreamUnavailableError:
            self.breaker.record_unavailable()
            raise
        except RequestError:
            self.breaker.record_success()  # Clerk answered, if only to refuse
            raise
        self.breaker.record_success()
        return token

    async def _deliver(self, message: AbstractIncomingMessage, envelope: Envelope, reply: Reply, lane: Lane) -> None:
        content_type = reply_content_type(envelope.content_type)
        outgoing = broker.reply_message(
            encode_reply(reply, content_type),
            content_type=content_type,
            correlation_id=envelope.correlation_id,
            outcome="created" if isinstance(reply, Created) else "failed",
        )
        try:
            await self._publisher_or_fail().publish(outgoing, envelope.reply_to)
        except broker.ReplyRefusedError:
            await self._reply_refused(message, envelope.idempotency_key, reply, lane)
            return
        except broker.ReplyFateUnknownError:
            log.warning("reply_fate_unknown", reply_to=envelope.reply_to)
            await self._return(message)
            return
        await self._ack(message)
        self.metrics.requests.labels(lane.value, outcome_of(reply)).inc()
        log.info("replied", outcome=outcome_of(reply), reply_to=envelope.reply_to)

    async def _reply_refused(
        self,
        message: AbstractIncomingMessage,
        key: IdempotencyKey | None,
        reply: Reply,
        lane: Lane,
    ) -> None:
        """Nobody can receive the reply: revoke its token, dead-letter the request."""
        log.warning("reply_refused", reply_to=message.reply_to)
        if isinstance(reply, Created):
            self.dedup.forget(key)
            await self._revoke(reply.sign_in_token)
        await self._dead_letter(message, lane, "reply_refused")

    async def _dead_letter(self, message: AbstractIncomingMessage, lane: Lane, reason: str) -> None:
        try:
            await self._publisher_or_fail().dead_letter(message, reason)
        except (broker.ReplyRefusedError, broker.ReplyFateUnknownError):
            log.warning("dead_letter_failed", reason=reason)
            await self._return(message)
            return
        await self._ack(message)
        self.metrics.requests.labels(lane.value, "dead_lettered").inc()
        log.warning("dead_lettered", reason=reason)

    async def _revoke(self, token: SignInToken) -> None:
        """Revoke a token nobody will receive; failures are logged, not raised."""

        async def attempt() -> None:
            with self.metrics.upstream_latency.labels("revoke").time():
                await self.clerk.revoke(token.id)

        try:
            await self.retry.run(attempt, deadline=None, sleep=self._sleep_unless_stopping)
        except (ServiceError, asyncio.CancelledError) as exc:
            log.error(  # noqa: TRY400 - a traceback could carry the token
                "revoke_failed", sign_in_token_id=token.id, reason=type(exc).__name__
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.metrics.revoked.inc()
        log.warning("token_revoked", sign_in_token_id=token.id)

    # -- acknowledgements ----------------------------------------------------

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except broker.CHANNEL_FAILURES:
            # The channel is gone: the broker redelivers, and the store answers again.
            log.warning("ack_lost")

    async def _return(self, message: AbstractIncomingMessage) -> None:
        """Give the request back to its queue (the broker does so anyway if the channel died)."""
        with contextlib.suppress(*broker.CHANNEL_FAILURES):
            await message.nack(requeue=True)

    def _publisher_or_fail(self) -> broker.ReplyPublisher:
        if self._publisher is None:
            msg = "Worker.start() was not called"
            raise RuntimeError(msg)
        return self._publisher

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        if self.stopping.is_set():
            raise ShutdownRequestedError("shutting down")

    # -- the key -------------------------------------------------------------

    async def _hold_for_key(self, message: AbstractIncomingMessage, lane: Lane) -> None:
        self.metrics.key_rejected.inc()
        if self._probe is not None or self.stopping.is_set():
            await self._return(message)
            return
        self.key_ok = False
        # Registered before any await, so concurrent 401s see there is a probe.
        self._probe = asyncio.create_task(self._probe_key(message, lane))
        log.error("secret_key_rejected", action="pausing consumption; holding one request as a probe")
        await self._pause("key_rejected")

    async def _probe_key(self, message: AbstractIncomingMessage, lane: Lane) -> None:
        """Retry the held request with backoff until Clerk accepts the key again."""
        held_since = time.monotonic()
        answered = False
        try:
            for delay in probe_delays(self.settings.probe_max_interval_seconds):
                await self._sleep_unless_stopping(delay)
                try:
                    await self.handle(message, lane)
                    answered = True
                    break
                except KeyRejectedError:
                    self.metrics.key_rejected.inc()
                    if time.monotonic() - held_since > self.settings.key_probe_hold_seconds:
                        # Held long enough: before the broker's consumer timeout
                        # takes the channel, return it; the next request probes.
                        await self._return(message)
                        break
                except ShutdownRequestedError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the probe must end, and consumption resume
                    await self._return_after_defect(message, exc)
                    break
        except ShutdownRequestedError:
            await self._return(message)
            return
        finally:
            self._probe = None
        self.key_ok = answered
        if answered:
            log.info("secret_key_accepted", action="resuming consumption")
        await self._resume("key_rejected")

    # -- pauses --------------------------------------------------------------

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


async def run_worker(settings: Settings, stop: asyncio.Event, *, name: str = "sign-in-token-worker") -> None:
    """Run a worker until ``stop`` is set, then shut it down within the grace period."""
    worker = Worker(settings, name=name)
    try:
        await worker.start()
        await stop.wait()
    finally:
        await worker.shutdown()
