"""Issuing a token: a request holds its idempotency key from before Clerk is called until its reply's fate is known.

The key's answer is made once (Clerk called with retries, under the breaker and the deadline),
remembered under the claim with a compare-and-set, and delivered while the key is held; a copy of
the request gets the same answer. Any operation that makes a token (``operations.Issues``) runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final, Literal

import msgspec
import structlog
from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.contract.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    RequestError,
    ShutdownRequestedError,
    UpstreamMalformedError,
    UpstreamUnavailableError,
)
from sign_in_tokens_client.contract.messages import Created, Reply, Token, created

from service import tracing
from service.amqp.envelope import Envelope
from service.clerk.breaker import OutageHold
from service.logs import bind, token_field
from service.state.dedup import UNRELATED, Claim, ClaimLostError, Found, Remembered
from service.state.dedup.cipher import AnswerUnreadableError
from service.state.grants import CLERK_DEFAULT_LIFETIME_SECONDS
from service.trust.audit import Subject
from service.trust.policy import Policy
from service.worker.delivery import Delivery, failed
from service.worker.operations import Issues, RequestT
from service.worker.parts import Parts
from service.worker.revocations import Revocations

log = structlog.get_logger(__name__)

# How long a request whose stored answer this worker cannot open waits before it goes back to its queue.
UNREADABLE_ANSWER_PAUSE_SECONDS: Final = 1.0
# What a reply is to its key's answer: the request made it, read it from the store, or neither.
Role = Literal["made", "stored", "other"]
# What a key's answer is remembered with: the request as the caller asked it (before the policy
# filled anything in), its objects' keys sorted. So a copy sent after a reload of the policy, or with
# its actor's keys in another order, is the same request and gets the same answer.
_asked = msgspec.json.Encoder(order="deterministic")


def _log_retry(attempt: int, error: BaseException | None, wait_seconds: float) -> None:
    log.info(
        "retrying_upstream",
        attempt=attempt,
        upstream_status=getattr(error, "upstream_status", None),
        error=getattr(error, "code", type(error).__name__),
        wait_seconds=round(wait_seconds, 3),
    )


class Issuing:
    """Answer a token-issuing request under its idempotency key."""

    def __init__(self, parts: Parts, delivery: Delivery, revocations: Revocations) -> None:
        """Call Clerk through ``parts``; deliver through ``delivery``; revoke through ``revocations``."""
        self.parts = parts
        self.delivery = delivery
        self.revocations = revocations

    async def answer(
        self,
        message: DeliveredMessage,
        envelope: Envelope,
        subject: Subject,
        policy: Policy,
        operation: Issues[RequestT],
    ) -> None:
        """Decode, admit, then answer under the key (UndecodableError, InvalidRequestError: the body is bad)."""
        deliver = self.delivery.deliver
        with tracing.span("decode"):
            request = operation.decode(message.body, envelope.content_type)
        bind(user_id=request.user_id)
        asked = _asked.encode(request)
        subject.asks_for(request)
        if subject.actor is not None:  # the impersonator: not a secret, and what an operator searches for
            bind(actor_sub=subject.actor["sub"])
        try:
            deadline = envelope.deadline()
            with tracing.span("policy"):
                request = operation.admit(policy, envelope.publisher, subject.lane, request)
        except RequestError as exc:
            await deliver(message, envelope, failed(exc), subject)
            return
        subject.asks_for(request)
        body = operation.clerk_body(request)
        # A claim lost while this request called Clerk (its lease ran out), the other request's answer not
        # delivered yet: this request's token was revoked, and it claims its key again, once, to wait for it.
        for _ in range(2):
            try:
                async with self.parts.dedup.claim(
                    envelope.idempotency_key(self.parts.state_id(subject.instance)), deadline
                ) as claim:
                    try:
                        reply, role = await self._claimed(claim, asked, body, deadline, subject, operation)
                    except ClaimLostError as lost:
                        if lost.answer is None:
                            continue
                        # Delivered already by the request that holds the key: sent again, settled by nobody here.
                        reply, role = self._stored(lost.answer, asked, body)[0], "other"
                    settles = claim if role != "other" else UNRELATED
                    await deliver(message, envelope, reply, subject, settles, mine=role == "made")
                    return
            except DeadlineExceededError as exc:  # waiting for the key held elsewhere
                await deliver(message, envelope, failed(exc), subject)
                return
            except AnswerUnreadableError as exc:
                await self._unreadable(message, unsettled=exc.unsettled)
                return
        await self.delivery.settle.give_back(message, "idempotency_key_contended")

    async def _unreadable(self, message: DeliveredMessage, *, unsettled: bool) -> None:
        """The key's answer was stored by a replica with another sealing key (a roll under way): one holding it answers.

        Given back after a pause, so the queue's delivery limit spans a rollout, not a spin. At the
        last delivery an unsettled answer's token is counted: dead-lettered, it may reach nobody,
        and this replica cannot read which token to revoke.
        """
        settle = self.delivery.settle
        if unsettled and settle.last_delivery(message):
            self.parts.metrics.count_unsettled("answer_unreadable")
            log.error("token_fate_unknown", reason="answer_unreadable")
        log.warning("idempotency_answer_unreadable", action="returned to its queue for a replica with the key")
        with contextlib.suppress(ShutdownRequestedError):
            await self.parts.sleep_unless_stopping(UNREADABLE_ANSWER_PAUSE_SECONDS)
        await settle.give_back(message, "idempotency_answer_unreadable")

    def _stored(self, remembered: Remembered, asked: bytes, body: bytes) -> tuple[Reply, bool]:
        """The answer the store holds for this key, when it answered this very request; whether it did.

        The request is as it was asked (``_asked``; Clerk's body in answers stored by earlier
        versions). An actor token's always names its actor, a sign-in token's never: one kind's key
        never answers a request for the other.
        """
        if remembered.request not in (asked, body):
            msg = "message_id was already used for a different request; use a new message_id for each request"
            return failed(InvalidRequestError(msg)), False
        self.parts.metrics.dedup_hits.inc()
        log.info("answered_from_idempotency_store")
        return remembered.reply, True

    async def _claimed(
        self,
        claim: Claim,
        asked: bytes,
        body: bytes,
        deadline: float | None,
        subject: Subject,
        operation: Issues[RequestT],
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
            reply, same = self._stored(claim.remembered, asked, body)
            return reply, "stored" if same else "other"
        try:
            token = await self._create(body, deadline, subject, operation)
        except RequestError as exc:
            reply = failed(exc)
            if not exc.final:
                return reply, "other"
            await self._remember(claim, asked, reply, subject)
            return reply, "made"
        reply = created(token)
        await self._remember(claim, asked, reply, subject)
        return reply, "made"

    async def _remember(self, claim: Claim, asked: bytes, reply: Reply, subject: Subject) -> None:
        """Store the answer under the claim; if the claim was lost, revoke this request's token and raise."""
        lifetime = subject.expires_in_seconds or CLERK_DEFAULT_LIFETIME_SECONDS
        try:
            await claim.remember(asked, reply, lifetime, subject)
        except asyncio.CancelledError:
            # Stopped past the grace period while Redis was away: the token was made and cannot be stored.
            if isinstance(reply, Created):
                self.parts.metrics.count_unsettled("stopped_before_stored")
                log.error(  # noqa: TRY400 - a stop, not a defect: no traceback
                    "token_fate_unknown",
                    reason="stopped_before_stored",
                    **token_field(reply.kind, reply.token_object.id),
                )
            raise
        except ClaimLostError:
            log.warning("idempotency_claim_lost", action="answering with the stored answer; revoking this token")
            if isinstance(reply, Created):
                await self.revocations.order(reply.token_object.id, subject, "claim_lost")
            raise

    async def _create(
        self, body: bytes, deadline: float | None, subject: Subject, operation: Issues[RequestT]
    ) -> Token:
        """Call Clerk, retrying transient failures; raise the final RequestError."""
        parts = self.parts
        if deadline is not None and time.time() >= deadline:
            msg = "x-deadline passed before the request was processed"
            raise DeadlineExceededError(msg)
        hold = parts.upstream(subject.instance).breaker.hold()

        async def attempt() -> Token:
            return await self._attempt(body, deadline, subject, hold, operation)

        async def backoff(seconds: float) -> None:
            parts.metrics.labelled(parts.metrics.retries, subject.source_label).inc()
            await parts.sleep_unless_stopping(seconds)

        token, attempts = await parts.retry.run(attempt, deadline=deadline, sleep=backoff, on_retry=_log_retry)
        bind(attempts=attempts, **token_field(operation.kind, token.id))
        if tracing.enabled():
            tracing.annotate(**{"sign_in_tokens.attempts": attempts})
        return token

    async def _attempt(
        self, body: bytes, deadline: float | None, subject: Subject, hold: OutageHold, operation: Issues[RequestT]
    ) -> Token:
        """One attempt: wait out an outage, take a turn, call; a token that comes too late is revoked."""
        upstream = self.parts.upstream(subject.instance)
        if self.parts.holding:  # the request waits in the hold queue, not in the lane's prefetch
            upstream.check()
        await upstream.breaker.wait_closed(deadline, hold)
        token = await self._call(body, subject, deadline, operation)
        if deadline is not None and time.time() > deadline:
            await self.revocations.order(token.id, subject, "after_deadline")
            msg = "Clerk answered after x-deadline; the token was revoked"
            raise DeadlineExceededError(msg, upstream_status=200)
        return token

    async def _call(self, body: bytes, subject: Subject, deadline: float | None, operation: Issues[RequestT]) -> Token:
        """One call at Clerk, its answer told to the breaker."""
        upstream = self.parts.upstream(subject.instance)
        breaker = upstream.breaker
        try:
            token = await upstream.clerk.create(operation.kind, body, subject.lane, deadline)
        except UpstreamMalformedError as exc:
            breaker.record_success()  # Clerk answered; it is not down
            if exc.token_id is not None:
                await self.revocations.order(exc.token_id, subject, "malformed_answer")
            else:  # a token may exist, and nothing names it
                self.parts.metrics.ambiguous_creates.inc()
            raise
        except UpstreamUnavailableError:
            breaker.record_unavailable()
            raise
        except RequestError:
            breaker.record_success()  # Clerk answered, if only to refuse
            raise
        breaker.record_success()
        return token
