"""The upstream circuit breaker: when Clerk is down, wait for it instead of failing every request.

Closed, every attempt goes to Clerk. After ``threshold`` consecutive
answers that say Clerk is unavailable (5xx, timeouts, connection errors;
429 is rate limiting, handled by Retry-After), it opens: the worker stops
taking requests, and requests about to make an attempt wait, each bounded
by its deadline and by ``hold_seconds`` over all its attempts together (an
``OutageHold`` per request), and ended at once by the worker's stop. While
open, a probe asks Clerk with a body it must refuse (``POST /sign_in_tokens
{}``: 422, no token created), backing off to ``probe_max_interval_seconds``;
any answer below 500 closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
from sign_in_tokens_client.contract.errors import (
    DeadlineExceededError,
    ServiceError,
    ShutdownRequestedError,
    UpstreamUnavailableError,
)

from service.clerk.retry import probe_delays

log = structlog.get_logger(__name__)

Probe = Callable[[], Awaitable[bool]]
Listener = Callable[[], Awaitable[None]]


class OutageHold:
    """What is left of one request's time to wait out outages, over all its attempts."""

    def __init__(self, seconds: float) -> None:
        """A request may be held ``seconds`` in all."""
        self.total = seconds
        self.remaining = seconds


class UpstreamBreaker:
    """Counts consecutive unavailable answers; opens, probes, and closes."""

    def __init__(
        self,
        *,
        threshold: int,
        hold_seconds: float,
        probe_max_interval_seconds: float,
        probe: Probe,
        on_open: Listener,
        on_close: Listener,
        stopping: asyncio.Event,
    ) -> None:
        """A closed breaker; ``probe`` returns whether Clerk answers again."""
        self._threshold = threshold
        self._hold = hold_seconds
        self._probe_max = probe_max_interval_seconds
        self._probe = probe
        self._on_open = on_open
        self._on_close = on_close
        self._stopping = stopping
        self._failures = 0
        self._closed = asyncio.Event()
        self._closed.set()
        self._prober: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        """Whether Clerk is considered down."""
        return not self._closed.is_set()

    def record_success(self) -> None:
        """Clerk answered (with a token or a refusal)."""
        self._failures = 0

    def record_unavailable(self) -> None:
        """Clerk was unavailable for one attempt; may open the breaker."""
        self._failures += 1
        if self._failures >= self._threshold and not self.is_open:
            self._closed.clear()
            log.error("upstream_unavailable_pausing", consecutive_failures=self._failures)
            self._prober = asyncio.create_task(self._probe_until_up())

    def hold(self) -> OutageHold:
        """A new request's allowance for waiting out outages."""
        return OutageHold(self._hold)

    async def wait_closed(self, deadline: float | None, hold: OutageHold) -> None:
        """Return when Clerk is up; raise when the deadline, the request's hold or a stop comes first."""
        if not self.is_open:
            return
        limit = hold.remaining if deadline is None else min(hold.remaining, deadline - time.time())
        started = time.monotonic()
        waits = {asyncio.ensure_future(self._closed.wait()), asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=max(0.0, limit), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            hold.remaining -= time.monotonic() - started
        if self._stopping.is_set():
            raise ShutdownRequestedError("shutting down")
        if not self.is_open:
            return
        if deadline is not None and time.time() >= deadline:
            msg = "x-deadline passed while Clerk was unavailable"
            raise DeadlineExceededError(msg)
        msg = f"Clerk unavailable for longer than {hold.total:g} s"
        raise UpstreamUnavailableError(msg)

    async def _probe_until_up(self) -> None:
        await self._on_open()
        for delay in probe_delays(self._probe_max):
            await asyncio.sleep(delay)
            try:
                if await self._probe():
                    break
            except ShutdownRequestedError:
                return
            except ServiceError:  # unavailable still, or the probe's wait cut short: probe again
                continue
        self.record_success()
        self._closed.set()
        log.info("upstream_available_resuming")
        await self._on_close()

    async def close(self) -> None:
        """Stop probing (shutdown)."""
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
