"""How fast this service calls Clerk: at most CLERK_RATE_LIMIT calls in every sliding window.

Clerk limits each secret key to a number of requests per 10 s (1,000 for
production keys, 100 for development ones), across every program that uses
the key. Every call to Clerk (create, revoke, probe) first takes a slot
here, so the service stays under the limit instead of collecting 429s.

Every sliding window of the length holds at most the limit (not fixed
buckets, which a limiter at the limit passes by luck of alignment). The
window is kept a little longer than Clerk's (``WINDOW_MARGIN``), since Clerk
counts a call when it arrives and we when we send it. It lives in one of two
places:

- in process (``MemoryWindow``, a deque of grant times) when REDIS_URL is
  unset: one replica, which says so at start;
- in Redis (``RedisWindow``) when it is set, shared by every replica. One
  Lua script takes a slot atomically on Redis's own clock, so replicas'
  clocks do not matter.

Both are our own: the ``limits`` library's moving window was measured first
and cost about 280 µs of CPU a call in process (each hit schedules an expiry
task that hops to a thread; the drain lost a quarter of its throughput),
and its Redis window sets the key's expiry in whole seconds (``EXPIRE``),
which refuses the fractional window the margin needs, and reads each
client's clock (docs/performance.md).
  While Redis cannot be reached, no slot is given (requests wait, bounded by
  their deadlines) and readiness says so: the limit is never exceeded.

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
from typing import Final, Protocol

from service.errors import DeadlineExceededError
from service.lanes import Lane

# Our window is longer than Clerk's by this fraction of it (at least MIN_MARGIN_SECONDS):
# a call reaches Clerk a little after it takes its slot, more so on a busy machine.
WINDOW_MARGIN: Final = 0.02
MIN_MARGIN_SECONDS: Final = 0.1
# Keys in Redis start with this, then a digest of the Clerk key: the limit is the key's.
REDIS_KEY_PREFIX: Final = "sign_in_tokens:clerk_rate"


class Window(Protocol):
    """Where the slots are counted."""

    @property
    def available(self) -> bool:
        """Whether the window can count slots now (Redis answers)."""
        ...

    async def take(self) -> float:
        """Take a slot: 0.0, or the seconds until one may be free."""
        ...

    async def hold(self, seconds: float) -> None:
        """Give no slot for ``seconds``."""
        ...

    async def close(self) -> None:
        """Release what the window holds."""
        ...


class MemoryWindow:
    """The moving window in this process: the grant times of the last window, oldest first."""

    def __init__(self, limit: int, seconds: float) -> None:
        """``limit`` slots in every ``seconds``."""
        self._limit = limit
        self._seconds = seconds
        self._grants: deque[float] = deque()
        self._held_until = 0.0
        self.available = True

    async def take(self) -> float:
        """Take a slot, or say how long until one may be free."""
        now = time.monotonic()
        if now < self._held_until:
            return self._held_until - now
        grants = self._grants
        while grants and grants[0] <= now - self._seconds:
            grants.popleft()
        if len(grants) < self._limit:
            grants.append(now)
            return 0.0
        return max(0.001, grants[0] + self._seconds - now)

    async def hold(self, seconds: float) -> None:
        """Give no slot for ``seconds``."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)

    async def close(self) -> None:
        """Nothing to release."""


class ClerkRateLimiter:
    """Slots for calls to Clerk: ``limit`` in every ``window_seconds``, interactive lane first."""

    def __init__(self, limit: int, window_seconds: float, redis_url: str | None = None, key_id: str = "") -> None:
        """A limiter in this process, or shared through Redis at ``redis_url`` by every user of ``key_id``."""
        self.limit = limit
        self.window_seconds = window_seconds
        seconds = window_seconds + max(MIN_MARGIN_SECONDS, WINDOW_MARGIN * window_seconds)
        self.shared = redis_url is not None
        self._window: Window
        if redis_url is None:
            self._window = MemoryWindow(limit, seconds)
        else:
            # Imported only when used: the Redis client adds a quarter of a second to start-up.
            from service.ratelimit._redis import RedisWindow  # noqa: PLC0415

            self._window = RedisWindow(redis_url, limit, seconds, f"{REDIS_KEY_PREFIX}:{key_id}")
        self._waiting: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """Whether slots can be counted (Redis answers, when the window is there)."""
        return self._window.available

    def waiting(self, lane: Lane) -> int:
        """How many requests of ``lane`` wait for a slot."""
        return sum(1 for f in self._waiting[lane] if not f.done())

    async def hold(self, seconds: float) -> None:
        """Give no slot for ``seconds``: Clerk said 429 with this ``Retry-After``."""
        await self._window.hold(seconds)

    async def acquire(self, lane: Lane, deadline: float | None = None) -> None:
        """Wait for a slot; DeadlineExceededError when ``deadline`` (Unix seconds) comes first."""
        if not self._has_waiters() and await self._window.take() == 0.0:
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
            wait = await self._window.take()
            if wait == 0.0:
                waiter = self._next_waiter()
                if waiter is not None:
                    waiter.set_result(None)
            else:
                await asyncio.sleep(max(0.001, wait))

    async def close(self) -> None:
        """Stop the dispatcher and release the window (shutdown)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await self._window.close()
