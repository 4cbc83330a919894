"""One Clerk instance's side of the service: its client (key, URL, rate limit, turns) and its breaker.

Each instance fails alone: a 401 (its key rejected) or an outage (its breaker open) holds that
instance's requests only, and ``held`` says so. The worker builds one ``Upstream`` per instance of
CLERK_INSTANCES_FILE (or the one of CLERK_SECRET_KEY, ``default``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from sign_in_tokens_client.contract.errors import ServiceError

from service.clerk.breaker import UpstreamBreaker
from service.clerk.instances import Instance
from service.clerk.upstream import ClerkClient, Observe
from service.config import Settings

# Told the instance's name when its breaker opens, and when it closes.
OnInstance = Callable[[str], Awaitable[None]]
# Why a request waits in its instance's hold queue: the key rejected, Clerk down, or (bulk) its rate limit full.
HoldReason = Literal["key_rejected", "upstream_unavailable", "busy"]


class InstanceHeldError(ServiceError):
    """The request's Clerk instance cannot take it now: it waits in the instance's hold queue."""

    def __init__(self, instance: str, reason: HoldReason) -> None:
        """Name the instance, and why."""
        super().__init__(f"Clerk instance {instance!r} is held ({reason})")
        self.instance = instance
        self.reason: HoldReason = reason


@dataclass(eq=False)
class Upstream:
    """One instance's client and breaker."""

    clerk: ClerkClient
    breaker: UpstreamBreaker

    @property
    def instance(self) -> Instance:
        """The instance it calls (its key as read when it was built)."""
        return self.clerk.instance

    @property
    def name(self) -> str:
        """The instance's name."""
        return self.clerk.instance.name

    @property
    def key_ok(self) -> bool:
        """Whether Clerk's last word on the key accepted it (true until it has said anything)."""
        return self.clerk.key_accepted is not False

    @property
    def held(self) -> bool:
        """Whether this instance's requests must wait: its key rejected, or its breaker open."""
        return self.hold_reason is not None

    @property
    def hold_reason(self) -> HoldReason | None:
        """Why this instance's requests must wait, or None while it works."""
        if not self.key_ok:
            return "key_rejected"
        if self.breaker.is_open:
            return "upstream_unavailable"
        return None

    def check(self) -> None:
        """InstanceHeldError while the instance is held."""
        reason = self.hold_reason
        if reason is not None:
            raise InstanceHeldError(self.name, reason)


def build_upstream(
    settings: Settings,
    instance: Instance,
    *,
    observe: Observe,
    on_cut: Callable[[], None],
    on_open: OnInstance,
    on_close: OnInstance,
    stopping: asyncio.Event,
    succeeds: Upstream | None = None,
) -> Upstream:
    """An instance's client and breaker; ``on_open``/``on_close`` are told its name as its breaker turns.

    ``succeeds``: the instance's upstream before a SIGHUP, whose turns, rate limiter and breaker go
    on (the breaker's probe is sent through the new client, as every call still waiting in the old).
    """
    clerk = ClerkClient(settings, instance, observe, on_cut, None if succeeds is None else succeeds.clerk)
    if succeeds is not None:
        return Upstream(clerk, succeeds.breaker)
    breaker = UpstreamBreaker(
        threshold=settings.outage_failure_threshold,
        hold_seconds=settings.outage_hold_seconds,
        probe_max_interval_seconds=settings.probe_max_interval_seconds,
        probe=clerk.probe,
        on_open=lambda: on_open(instance.name),
        on_close=lambda: on_close(instance.name),
        stopping=stopping,
    )
    return Upstream(clerk, breaker)
