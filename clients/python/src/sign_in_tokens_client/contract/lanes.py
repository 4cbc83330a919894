"""The two lanes and the gate that serves the interactive lane first.

Every call to Clerk takes a turn at the gate, after its slot under the rate
limit (service.clerk.ratelimit). The gate has a fixed number of slots (upstream
concurrency); when a slot frees, a waiting interactive request gets it
before any bulk request. A request waiting out a retry backoff or a rate
slot holds no turn.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, Literal

# The queues callers publish to, by default (the service's REQUEST_QUEUE, BULK_QUEUE, IMPERSONATION_QUEUE,
# REVOKE_QUEUE).
REQUEST_QUEUE: Final = "sign_in_tokens.create"
BULK_QUEUE: Final = "sign_in_tokens.create.bulk"
IMPERSONATION_QUEUE: Final = "sign_in_tokens.impersonate"
REVOKE_QUEUE: Final = "sign_in_tokens.revoke"


class Lane(enum.Enum):
    """Which queue a request came from; the order is the order of service."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


# The other queues the worker consumes, each served at Clerk as interactive calls: impersonations
# (IMPERSONATION_QUEUE), revocations (REVOKE_QUEUE), and the worker's own orders to revoke tokens
# nobody holds (REVOCATIONS_QUEUE).
IMPERSONATE: Final = "impersonate"
REVOKE: Final = "revoke"
REVOCATIONS: Final = "revocations"
Source = Lane | Literal["impersonate", "revoke", "revocations"]


def source_label(source: Source) -> str:
    """A source's name in metrics and logs: ``interactive``, ``bulk``, ``impersonate`` or ``revoke``."""
    return source.value if isinstance(source, Lane) else source


class LaneGate:
    """A semaphore whose waiters are served interactive lane first, then in arrival order."""

    def __init__(self, slots: int) -> None:
        """A gate with ``slots`` concurrent turns."""
        self._free = slots
        self._waiting: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}

    def waiting(self, lane: Lane) -> int:
        """How many requests of ``lane`` wait for a turn."""
        return sum(1 for f in self._waiting[lane] if not f.done())

    async def _acquire(self, lane: Lane) -> None:
        if self._free > 0 and not any(self._waiting.values()):
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[lane].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # the turn was handed over as we were cancelled: pass it on
            elif future in self._waiting[lane]:  # _release may already have skipped it
                self._waiting[lane].remove(future)
            raise

    def _release(self) -> None:
        for lane in Lane:
            queue = self._waiting[lane]
            while queue:
                future = queue.popleft()
                if not future.done():
                    future.set_result(None)
                    return
        self._free += 1

    @asynccontextmanager
    async def turn(self, lane: Lane) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block."""
        await self._acquire(lane)
        try:
            yield
        finally:
            self._release()
