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
  clocks do not matter. While Redis cannot be reached, no slot is given
  (requests wait, bounded by their deadlines) and readiness says so.

The lanes under the limit. The interactive lane is served first: in each
process by one dispatcher, and across the fleet because a replica with an
interactive request waiting says so in the window (Redis: a sorted set of
replicas, each entry expiring after ``WAITER_TTL_SECONDS``), and no replica
gives a bulk request a slot meanwhile. Bulk may never take the last
``RESERVE`` of the window, and is paced: at most ``burst`` slots (a
``1 / BURST_SLICES`` share of the window) in the time the window's rate
takes to free them. Bulk is spread evenly over the window,
so slots free up steadily and a waiting interactive request never waits for
a whole window to age out.

After a 429 (another program on the same key, or Clerk counting otherwise),
``on_429`` holds every slot until Clerk's ``Retry-After`` and lowers the
rate to ``CUT`` of what it was (once per hold, not per 429); the rate then
climbs back by ``CLIMB`` of the limit per window. A request waiting for its
slot holds no upstream connection and spends no attempt; one whose
``x-deadline`` passes while it waits is not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import structlog
from sign_in_tokens_client.contract.errors import DeadlineExceededError, ShutdownRequestedError
from sign_in_tokens_client.contract.lanes import Lane

if TYPE_CHECKING:
    from service.state.redis_link import RedisLink

# Our window is longer than Clerk's by this fraction of it (at least MIN_MARGIN_SECONDS):
# a call reaches Clerk a little after it takes its slot, more so on a busy machine.
WINDOW_MARGIN: Final = 0.02
MIN_MARGIN_SECONDS: Final = 0.1
# The share of the window bulk leaves to the interactive lane (at least one slot, when the limit is above one).
RESERVE: Final = 0.005
# Bulk takes at most 1/BURST_SLICES of the window at once, then keeps to the window's average rate
# times PACE_HEADROOM: a little faster, so a missed beat is caught up; the window still caps it.
BURST_SLICES: Final = 200
PACE_HEADROOM: Final = 1.1
# After a 429 the rate is cut to CUT of what it was, then climbs by CLIMB of the limit per window.
CUT: Final = 0.9
CLIMB: Final = 0.02
# How long a replica's word that an interactive request waits lasts without being renewed.
WAITER_TTL_SECONDS: Final = 1.0
# The longest a dispatcher sleeps before asking the window again.
MAX_POLL_SECONDS: Final = 0.25
# Keys in Redis start with this, then a digest of the Clerk key: the limit is the key's.
REDIS_KEY_PREFIX: Final = "sign_in_tokens:clerk_rate"

log = structlog.get_logger(__name__)


def reserve(effective: int) -> int:
    """The slots bulk leaves free for the interactive lane in a window of ``effective`` slots."""
    return 0 if effective <= 1 else math.ceil(RESERVE * effective)


def burst(effective: int) -> int:
    """The most slots bulk takes at once: in any ``burst * seconds / effective`` it takes at most this many."""
    return max(1, math.ceil(effective / BURST_SLICES))


def climbed(limit: int, cut_to: float, seconds_since: float, window_seconds: float) -> float:
    """The rate ``seconds_since`` a cut to ``cut_to``: back up by CLIMB of the limit per window."""
    return min(float(limit), cut_to + CLIMB * limit * seconds_since / window_seconds)


class Window(Protocol):
    """Where the slots are counted."""

    @property
    def available(self) -> bool:
        """Whether the window can count slots now (Redis answers)."""
        ...

    @property
    def redis(self) -> RedisLink | None:
        """The link to Redis, for a window kept there."""
        ...

    async def take(self, lane: Lane, interactive_left: int) -> float:
        """Take a slot for ``lane``: 0.0, or the seconds until one may be free.

        ``interactive_left``: this replica's interactive requests still waiting after this one.
        """
        ...

    async def on_429(self, seconds: float) -> float | None:
        """Give no slot for ``seconds`` and cut the rate; return the new rate, or None if already held."""
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
        self._cut: tuple[float, float] | None = None  # the rate cut to, and when
        self.available = True
        self.redis: RedisLink | None = None

    def _effective(self, now: float) -> float:
        if self._cut is None:
            return float(self._limit)
        rate = climbed(self._limit, self._cut[0], now - self._cut[1], self._seconds)
        if rate >= self._limit:
            self._cut = None
        return rate

    async def take(self, lane: Lane, interactive_left: int) -> float:
        """Take a slot, or say how long until one may be free."""
        del interactive_left  # one process: its dispatcher already serves interactive first
        now = time.monotonic()
        if now < self._held_until:
            return self._held_until - now
        grants = self._grants
        while grants and grants[0] <= now - self._seconds:
            grants.popleft()
        effective = max(1, int(self._effective(now)))
        cap = effective
        if lane is Lane.BULK:
            cap -= reserve(effective)
            most = burst(effective)
            slice_seconds = self._seconds * most / (effective * PACE_HEADROOM)
            if len(grants) >= most and grants[-most] > now - slice_seconds:
                return grants[-most] + slice_seconds - now
        if len(grants) < cap:
            grants.append(now)
            return 0.0
        return max(0.001, grants[len(grants) - cap] + self._seconds - now)

    async def on_429(self, seconds: float) -> float | None:
        """Give no slot for ``seconds``; cut the rate unless a hold was already on."""
        now = time.monotonic()
        held = now < self._held_until
        self._held_until = max(self._held_until, now + seconds)
        if held:
            return None
        rate = max(1.0, CUT * self._effective(now))
        self._cut = (rate, now)
        return rate

    async def close(self) -> None:
        """Nothing to release."""


class LimiterRetiredError(Exception):
    """The limiter was replaced (a SIGHUP changed its instance's limit, or removed the instance): wait elsewhere."""


class ClerkRateLimiter:
    """Slots for calls to Clerk: ``limit`` in every ``window_seconds``, interactive lane first."""

    def __init__(self, limit: int, window_seconds: float, redis_url: str | None = None, state_id: str = "") -> None:
        """A limiter in this process, or shared in Redis at ``redis_url`` by every caller of ``state_id``'s instance."""
        self.limit = limit
        self.window_seconds = window_seconds
        seconds = window_seconds + max(MIN_MARGIN_SECONDS, WINDOW_MARGIN * window_seconds)
        self.shared = redis_url is not None
        self._window: Window
        if redis_url is None:
            self._window = MemoryWindow(limit, seconds)
        else:
            # Imported only when used: the Redis client adds a quarter of a second to start-up.
            from service.clerk.ratelimit._redis import RedisWindow  # noqa: PLC0415

            self._window = RedisWindow(redis_url, limit, seconds, f"{REDIS_KEY_PREFIX}:instance:{state_id}")
        self._waiting: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}
        self._dispatcher: asyncio.Task[None] | None = None
        # Set when an interactive request starts waiting: the dispatcher asks again at once,
        # rather than sleep out a wait the window gave for bulk.
        self._wake = asyncio.Event()
        # After ``stop`` (or ``retire``): no slot for anyone, this raised instead.
        self._stopped: Callable[[], Exception] | None = None

    @property
    def available(self) -> bool:
        """Whether slots can be counted (Redis answers, when the window is there)."""
        return self._window.available

    @property
    def redis(self) -> RedisLink | None:
        """The link to Redis, when the window is kept there."""
        return self._window.redis

    def waiting(self, lane: Lane) -> int:
        """How many requests of ``lane`` wait for a slot."""
        return sum(1 for f in self._waiting[lane] if not f.done())

    async def on_429(self, retry_after: float) -> None:
        """Clerk said 429: no slot on any replica for ``retry_after`` seconds, and a lower rate for a while."""
        rate = await self._window.on_429(retry_after)
        if rate is not None:
            log.warning(
                "rate_limit_lowered",
                calls=int(rate),
                window_seconds=self.window_seconds,
                held_seconds=retry_after,
                climbs_back=f"{CLIMB:.0%} of {self.limit} a window",
            )

    def stop(self) -> None:
        """Shutdown: no new call gets a slot; those waiting raise ShutdownRequestedError at once."""
        self._end(lambda: ShutdownRequestedError("shutting down"))

    def retire(self) -> None:
        """Replaced (SIGHUP): no new call gets a slot; those waiting raise LimiterRetiredError at once."""
        self._end(LimiterRetiredError)

    def _end(self, error: Callable[[], Exception]) -> None:
        self._stopped = error
        self.flush(error)

    def flush(self, error: Callable[[], Exception]) -> None:
        """Those waiting now raise ``error()`` at once (their instance is held: they wait in its hold queue)."""
        for queue in self._waiting.values():
            for future in queue:
                if not future.done():
                    future.set_exception(error())

    async def acquire(self, lane: Lane, deadline: float | None = None) -> None:
        """Wait for a slot; DeadlineExceededError when ``deadline`` (Unix seconds) comes first.

        ShutdownRequestedError after ``stop``, and at once for a call waiting when it comes.
        """
        if self._stopped is not None:
            raise self._stopped()
        if not self._has_waiters() and await self._window.take(lane, 0) == 0.0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[lane].append(future)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        elif lane is Lane.INTERACTIVE:
            self._wake.set()
        try:
            await asyncio.wait_for(future, None if deadline is None else max(0.0, deadline - time.time()))
        except TimeoutError:
            msg = "x-deadline passed while the request waited for a slot under Clerk's rate limit"
            raise DeadlineExceededError(msg) from None

    def _has_waiters(self) -> bool:
        return any(not f.done() for queue in self._waiting.values() for f in queue)

    def _next_lane(self) -> tuple[Lane, int] | None:
        """The lane whose waiter is served next, and how many interactive requests would still wait."""
        for lane in Lane:
            queue = self._waiting[lane]
            while queue and queue[0].done():
                queue.popleft()
            if queue:
                left = self.waiting(Lane.INTERACTIVE) - 1 if lane is Lane.INTERACTIVE else 0
                return lane, left
        return None

    async def _dispatch(self) -> None:
        """Hand out slots as the window frees them, interactive lane first."""
        while (turn := self._next_lane()) is not None:
            lane, interactive_left = turn
            wait = await self._window.take(lane, interactive_left)
            if wait == 0.0:
                queue = self._waiting[lane]
                if queue and not queue[0].done():
                    queue.popleft().set_result(None)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(MAX_POLL_SECONDS, max(0.001, wait)))

    async def close(self) -> None:
        """Stop the dispatcher and release the window (shutdown)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await self._window.close()
