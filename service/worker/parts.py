"""What one message's path uses, made once by the worker and shared by each step of the path.

The worker (``lifecycle.py``) builds the parts and opens the broker's side at start; the steps of
the pipeline (``pipeline.py``, ``issuing.py``, ``delivery.py``, ``revocations.py``,
``settle.py``) each take the parts they need from here, and nothing of the lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from sign_in_tokens_client.connection import DEFAULT_INSTANCE, INSTANCE_HEADER
from sign_in_tokens_client.contract.errors import InvalidRequestError, ShutdownRequestedError

from service.amqp import publisher
from service.amqp.acks import Acks
from service.clerk.retry import RetryPolicy
from service.clerk.upstreams import Upstream
from service.config import Settings
from service.state.dedup import IdempotencyStore
from service.state.grants import Grants
from service.trust.audit import AuditTrail
from service.trust.policy import Policy
from service.trust.sealing import SealingKeys
from service.worker.health import Metrics

_NOT_STARTED = "Worker.start() was not called"


@dataclass
class Parts:
    """The worker's parts a message's path uses (the broker's two are set by the worker's start)."""

    settings: Settings
    metrics: Metrics
    # Each Clerk instance's client and breaker, by name (CLERK_INSTANCES_FILE's; without it, ``default``).
    upstreams: dict[str, Upstream]
    retry: RetryPolicy
    dedup: IdempotencyStore
    grants: Grants
    policy: Policy
    stopping: asyncio.Event
    # CLERK_INSTANCES_FILE: a held instance's requests move to its hold queue (else the worker pauses).
    holding: bool = False
    # The state id of each instance served (kept after a SIGHUP removes one).
    state_ids: dict[str, str] = field(default_factory=dict)
    acks: Acks = field(default_factory=Acks)
    publisher_or_none: publisher.ReplyPublisher | None = None
    audit_or_none: AuditTrail | None = None
    # The worker's sealing key (REPLY_SEALING_KEY_FILE; a SIGHUP reads it again), for sealed replies.
    sealing: SealingKeys = field(default_factory=lambda: SealingKeys(None))

    @property
    def instances(self) -> frozenset[str]:
        """The Clerk instances a request may name."""
        return frozenset(self.upstreams)

    def upstream(self, instance: str | None) -> Upstream:
        """The client and breaker of ``instance`` (None: an order or a request of before instances, ``default``).

        InvalidRequestError when a SIGHUP removed it after the request was admitted.
        """
        name = instance or DEFAULT_INSTANCE
        found = self.upstreams.get(name)
        if found is None:
            msg = f"{INSTANCE_HEADER}: there is no Clerk instance {name!r} any more"
            raise InvalidRequestError(msg)
        return found

    def state_id(self, instance: str | None) -> str:
        """What ``instance``'s shared state (idempotency answers, grants) is kept under: never its key.

        Known for every instance this process has served, so a token made just before a SIGHUP
        removed its instance is still recorded under it.
        """
        name = instance or DEFAULT_INSTANCE
        upstream = self.upstreams.get(name)
        return upstream.instance.state_id if upstream is not None else self.state_ids.get(name, name)

    def serve(self, upstreams: dict[str, Upstream]) -> None:
        """Serve these instances from now on (at start, and at each SIGHUP)."""
        self.upstreams = upstreams
        self.state_ids.update({name: upstream.instance.state_id for name, upstream in upstreams.items()})

    @property
    def publisher(self) -> publisher.ReplyPublisher:
        """Replies, dead letters and revocation orders go out through it."""
        if self.publisher_or_none is None:
            raise RuntimeError(_NOT_STARTED)
        return self.publisher_or_none

    @property
    def audit(self) -> AuditTrail:
        """Where every outcome is recorded."""
        if self.audit_or_none is None:
            raise RuntimeError(_NOT_STARTED)
        return self.audit_or_none

    async def sleep_unless_stopping(self, seconds: float) -> None:
        """Wait ``seconds``; ShutdownRequestedError as soon as the worker is told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        if self.stopping.is_set():
            raise ShutdownRequestedError("shutting down")
