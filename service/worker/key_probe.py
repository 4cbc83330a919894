"""A rejected key (one Clerk key, no CLERK_INSTANCES_FILE): the worker stops consuming, holds one request as a probe.

And resumes by itself. (With the instances file, a rejected key holds its instance alone: ``holds.py``.)

A 401 from Clerk is not a request's failure. The held request is tried again with backoff; once it
is answered without Clerk's word on the key (its deadline passed, or it came from the store) or
its hold runs out, a call that creates no token probes. The other requests go back to their
queues meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
from aiormq.abc import DeliveredMessage
from sign_in_tokens_client.connection import DEFAULT_INSTANCE
from sign_in_tokens_client.contract.errors import KeyRejectedError, ShutdownRequestedError, UpstreamUnavailableError
from sign_in_tokens_client.contract.lanes import Source

from service.clerk.retry import probe_delays
from service.worker.parts import Parts
from service.worker.pipeline import Pipeline

log = structlog.get_logger(__name__)


class KeyProbe:
    """Hold one request as the probe while Clerk rejects the key; pause and resume the worker around it."""

    def __init__(
        self,
        parts: Parts,
        pipeline: Pipeline,
        pause: Callable[[str], Awaitable[None]],
        resume: Callable[[str], Awaitable[None]],
    ) -> None:
        """Probe with ``pipeline`` on ``parts``; ``pause`` and ``resume`` the worker's consumption."""
        self.parts = parts
        self.pipeline = pipeline
        self._pause = pause
        self._resume = resume
        self.task: asyncio.Task[None] | None = None

    async def hold(self, message: DeliveredMessage, lane: Source) -> None:
        """A request met a 401: the first becomes the probe; the others go back while it runs."""
        self._count_rejected()
        if self.task is not None or self.parts.stopping.is_set():
            await self.pipeline.settle.give_back(message, "key_rejected")
            return
        # Registered before any await, so concurrent 401s see there is a probe.
        self.task = asyncio.create_task(self._probe(message, lane))
        log.error("secret_key_rejected", action="pausing consumption; holding one request as a probe")
        await self._pause("key_rejected")

    async def _probe(self, message: DeliveredMessage, lane: Source) -> None:
        """Probe with backoff until Clerk accepts the key again, then resume."""
        parts = self.parts
        held: DeliveredMessage | None = message
        held_since = time.monotonic()
        try:
            for delay in probe_delays(parts.settings.probe_max_interval_seconds):
                await parts.sleep_unless_stopping(delay)
                if held is None:
                    with contextlib.suppress(UpstreamUnavailableError):
                        await parts.upstream(None).clerk.probe()
                else:
                    held = await self._try(held, lane, held_since)
                if parts.upstream(None).key_ok:
                    break
                self._count_rejected()
        except ShutdownRequestedError:
            if held is not None:
                await self.pipeline.settle.give_back(held, "shutting_down")
            return
        finally:
            self.task = None
        log.info("secret_key_accepted", action="resuming consumption")
        await self._resume("key_rejected")

    def _count_rejected(self) -> None:
        metrics = self.parts.metrics
        metrics.labelled(metrics.key_rejected, DEFAULT_INSTANCE).inc()

    async def _try(self, message: DeliveredMessage, lane: Source, held_since: float) -> DeliveredMessage | None:
        """Try the held request again; return it while it is still held."""
        try:
            await self.pipeline.handle(message, lane)
        except KeyRejectedError:
            if time.monotonic() - held_since <= self.parts.settings.key_probe_hold_seconds:
                return message
            # Held long enough: return it before the broker's consumer timeout takes the channel.
            await self.pipeline.settle.give_back(message, "key_probe_hold_expired")
        except ShutdownRequestedError:
            raise
        except Exception as exc:  # noqa: BLE001 - the probe must go on
            await self.pipeline.settle.after_defect(message, exc)
        return None
