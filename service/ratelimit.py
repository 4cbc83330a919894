"""How fast this service calls Clerk: at most CLERK_RATE_LIMIT calls in every sliding window.

Clerk limits each secret key to a number of requests per 10 s (1,000 for
production keys, 100 for development ones), across every program that uses
the key. Every call to Clerk (create, revoke, probe) first takes a slot
here, so the service stays under the limit instead of collecting 429s.

The window is the ``limits`` library's moving window (every sliding window
of the length holds at most the limit, not fixed buckets), kept in process:
one replica, which says so at start. The window is kept a little longer
than Clerk's (``WINDOW_MARGIN``), since Clerk counts a call when it arrives
and we when we send it.

A request waiting for its slot holds no upstream connection and spends no
attempt. Waiters are served by one dispatcher, interactive lane first, then
in arrival order, so a bulk backlog at the limit never takes the next slot
from a waiting interactive request. A request whose ``x-deadline`` passes
while it waits is not sent. After a 429 (another program on the same key,
or Clerk counting otherwise), ``hold_until`` stops every slot until Clerk's
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Final

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from service.errors import DeadlineExceededError
from service.lanes import Lane

# Our window is longer than Clerk's by this fraction of it (at least MIN_MARGIN_SECONDS).
WINDOW_MARGIN: Final = 0.01
MIN_MARGIN_SECONDS: Final = 0.05
_KEY: Final = "clerk"


class _SlidingWindow(RateLimitItemPerSecond):
    """``amount`` per window of any length in seconds (``limits`` counts whole seconds)."""

    __slots__ = ("_seconds",)

    def __init__(self, amount: int, seconds: float) -> None:
        super().__init__(amount, 1)
        self._seconds = seconds

    def get_expiry(self) -> float:  # type: ignore[override]  # the moving window takes any number
        return self._seconds


class ClerkRateLimiter:
    """Slots for calls to Clerk: ``limit`` in every ``window_seconds``, interactive lane first."""

    def __init__(self, limit: int, window_seconds: float) -> None:
        """An in-process limiter."""
        self.limit = limit
        self.window_seconds = window_seconds
        margin = max(MIN_MARGIN_SECONDS, WINDOW_MARGIN * window_seconds)
        self._window = _SlidingWindow(limit, window_seconds + margin)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._waiting: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}
        self._dispatcher: asyncio.Task[None] | None = None
        self._held_until = 0.0

    def waiting(self, lane: Lane) -> int:
        """How many requests of ``lane`` wait for a slot."""
        return sum(1 for f in self._waiting[lane] if not f.done())

    def hold_until(self, until: float) -> None:
        """Give no slot before ``until`` (Unix seconds): Clerk said 429."""
        self._held_until = max(self._held_until, until)

    async def acquire(self, lane: Lane, deadline: float | None = None) -> None:
        """Wait for a slot; DeadlineExceededError when ``deadline`` (Unix seconds) comes first."""
        if not self._has_waiters() and time.time() >= self._held_until and await self._take():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[lane].append(future)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        try:
            await asyncio.wait_for(future, None if deadline is None else max(0.0, deadline - time.time()))
        except TimeoutError:
            msg = "x-deadline passed while the request waited for a slot under Clerk's rate limit"
            raise DeadlineExceededError(msg) from None

    def _has_waiters(self) -> bool:
        return any(not f.done() for queue in self._waiting.values() for f in queue)

    async def _take(self) -> bool:
        return await self._limiter.hit(self._window, _KEY)

    def _next_waiter(self) -> asyncio.Future[None] | None:
        for lane in Lane:
            queue = self._waiting[lane]
            while queue:
                future = queue.popleft()
                if not future.done():
                    return future
        return None

    async def _dispatch(self) -> None:
        """Hand out slots as the window frees them, interactive lane first."""
        while self._has_waiters():
            now = time.time()
            if now < self._held_until:
                await asyncio.sleep(self._held_until - now)
            elif await self._take():
                waiter = self._next_waiter()
                if waiter is not None:
                    waiter.set_result(None)
            else:
                stats = await self._limiter.get_window_stats(self._window, _KEY)
                await asyncio.sleep(max(0.001, stats.reset_time - time.time()))

    async def close(self) -> None:
        """Stop the dispatcher (shutdown)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
