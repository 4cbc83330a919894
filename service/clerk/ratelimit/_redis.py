"""The rate limiter's window in Redis, shared by every replica that calls Clerk with the same key.

Five keys under the prefix: ``window`` (a list of grant times in µs, newest
first, at most the limit long), ``hold`` (set for Clerk's ``Retry-After``
after a 429), ``cut`` (the rate cut to after a 429, and when),
``interactive`` (a sorted set of the replicas with an interactive request
waiting, scored by when their word expires) and ``epoch`` (when this
window began, and a random name: it never expires). The scripts mirror
``MemoryWindow`` line for line, on Redis's clock.

A Redis emptied (FLUSHALL, a failover to an empty replica, a restart
without persistence) forgets the window while Clerk still counts the calls
in it. Each replica remembers the epoch it last saw: one that finds the
epoch gone or changed knows the window was lost, and no replica gets a
slot until a whole window has passed since the new epoch began (the calls
the old window held are all older than that). A replica that has never
seen an epoch (it just started) cannot tell an empty Redis from a new one:
the first replica of a fleet on a new Redis spends at once.
"""

from __future__ import annotations

import contextlib
import math
import uuid

import structlog
from sign_in_tokens_client.contract.lanes import Lane

from service.clerk.ratelimit import BURST_SLICES, CLIMB, CUT, PACE_HEADROOM, RESERVE, WAITER_TTL_SECONDS
from service.state.redis_link import REDIS_FAILURES, REDIS_RETRY_SECONDS, RedisLink

log = structlog.get_logger(__name__)

# Shared by both scripts: Redis's clock in µs, and the rate after any cut (dropping a cut that has climbed back).
_COMMON = """
local function now_us()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function effective(cut_key, limit, window, climb, now)
    local cut = redis.call('HMGET', cut_key, 'rate', 'at')
    if not cut[1] then
        return limit
    end
    local rate = tonumber(cut[1]) + climb * limit * (now - tonumber(cut[2])) / window
    if rate >= limit then
        redis.call('DEL', cut_key)
        return limit
    end
    return rate
end
"""

# KEYS: window, hold, cut, interactive, epoch.
# ARGV: limit, window µs, lane (i or b), replica id, interactive requests left after this one,
#       climb, burst slices, reserve share, waiter ttl µs, pace headroom,
#       the epoch this replica saw last (or ''), a name for a new epoch.
# Returns {0 (a slot taken) or the µs until one may be free, the epoch, 1 when the window was found lost}.
_TAKE = (
    _COMMON
    + """
local limit, window, lane = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now = now_us()
local epoch = redis.call('GET', KEYS[5])
local lost = 0
if not epoch then
    epoch = string.format('%.0f', now) .. ':' .. ARGV[12]
    redis.call('SET', KEYS[5], epoch)
end
if ARGV[11] ~= '' and epoch ~= ARGV[11] then
    lost = 1
    local began = tonumber(string.match(epoch, '^(%d+):'))
    local left_ms = math.ceil((began + window - now) / 1000)
    if left_ms > 0 and redis.call('PTTL', KEYS[2]) < left_ms then
        redis.call('SET', KEYS[2], 1, 'PX', left_ms)
    end
end
local function answer(wait)
    return {wait, epoch, lost}
end
local waiters = KEYS[4]
redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
if lane == 'i' then
    redis.call('ZADD', waiters, now + tonumber(ARGV[9]), ARGV[4])
    redis.call('PEXPIRE', waiters, math.ceil(tonumber(ARGV[9]) / 1000))
else
    redis.call('ZREM', waiters, ARGV[4])
end
local held = redis.call('PTTL', KEYS[2])
if held > 0 then
    return answer(held * 1000)
end
local rate = math.max(1, math.floor(effective(KEYS[3], limit, window, tonumber(ARGV[6]), now)))
local cap = rate
if lane == 'b' then
    if redis.call('ZCARD', waiters) > 0 then
        return answer(2000)
    end
    if rate > 1 then
        cap = rate - math.ceil(tonumber(ARGV[8]) * rate)
    end
    local most = math.max(1, math.ceil(rate / tonumber(ARGV[7])))
    local pace = window * most / (rate * tonumber(ARGV[10]))
    local recent = redis.call('LINDEX', KEYS[1], most - 1)
    if recent and tonumber(recent) > now - pace then
        return answer(math.max(1000, tonumber(recent) + pace - now))
    end
end
local oldest = redis.call('LINDEX', KEYS[1], cap - 1)
if oldest and tonumber(oldest) > now - window then
    return answer(math.max(1000, tonumber(oldest) + window - now))
end
redis.call('LPUSH', KEYS[1], now)
redis.call('LTRIM', KEYS[1], 0, limit - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
if lane == 'i' and tonumber(ARGV[5]) == 0 then
    redis.call('ZREM', waiters, ARGV[4])
end
return answer(0)
"""
)

# KEYS: hold, cut. ARGV: hold ms, limit, window µs, climb, cut.
# Returns the rate cut to, or -1 when a hold was already on (one cut per hold).
_ON_429 = (
    _COMMON
    + """
local ms = tonumber(ARGV[1])
local held = redis.call('PTTL', KEYS[1])
if held > 0 then
    if held < ms then
        redis.call('SET', KEYS[1], 1, 'PX', ms)
    end
    return -1
end
redis.call('SET', KEYS[1], 1, 'PX', ms)
local limit, window, climb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_us()
local rate = math.max(1, tonumber(ARGV[5]) * effective(KEYS[2], limit, window, climb, now))
redis.call('HSET', KEYS[2], 'rate', tostring(rate), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[2], math.ceil(window / 1000 / climb) + ms)
return math.floor(rate)
"""
)


class RedisWindow:
    """The moving window in Redis, shared by every replica that uses the same key prefix."""

    def __init__(self, url: str, limit: int, seconds: float, prefix: str) -> None:
        """``limit`` slots in every ``seconds``, under keys starting with ``prefix``, in the Redis at ``url``."""
        self._link = RedisLink(url, "rate_limit")
        self.redis: RedisLink | None = self._link
        client = self._link.client
        self._limit = limit
        self._window_us = int(seconds * 1_000_000)
        self._keys = [f"{prefix}:{name}" for name in ("window", "hold", "cut", "interactive", "epoch")]
        self._replica = uuid.uuid4().hex
        # The window's epoch as this replica last saw it ('' before it has seen one).
        self._epoch = ""
        self._take = client.register_script(_TAKE)
        self._on_429 = client.register_script(_ON_429)

    @property
    def available(self) -> bool:
        """Whether Redis answered the last command."""
        return self._link.available

    async def take(self, lane: Lane, interactive_left: int) -> float:
        """Take a slot, or say how long until one may be free (also while Redis is unreachable)."""
        args = [
            self._limit,
            self._window_us,
            "i" if lane is Lane.INTERACTIVE else "b",
            self._replica,
            interactive_left,
            CLIMB,
            BURST_SLICES,
            RESERVE,
            int(WAITER_TTL_SECONDS * 1_000_000),
            PACE_HEADROOM,
            self._epoch,
            uuid.uuid4().hex,
        ]
        try:
            wait_us, epoch, lost = await self._link.script(self._take, self._keys, args)
        except REDIS_FAILURES:
            return REDIS_RETRY_SECONDS  # the link has said so
        if lost:
            log.warning(
                "rate_window_lost",
                reason="Redis was emptied or replaced",
                action="no call to Clerk until the calls of the lost window are a window old",
            )
        self._epoch = epoch.decode()
        return int(wait_us) / 1_000_000

    async def on_429(self, seconds: float) -> float | None:
        """Give no slot, on any replica, for ``seconds``, and cut the shared rate unless already held."""
        args = [max(1, math.ceil(seconds * 1000)), self._limit, self._window_us, CLIMB, CUT]
        rate = -1
        with contextlib.suppress(*REDIS_FAILURES):
            rate = int(await self._link.script(self._on_429, self._keys[1:3], args))
        return None if rate < 0 else float(rate)

    async def close(self) -> None:
        """Close the client."""
        await self._link.close()
