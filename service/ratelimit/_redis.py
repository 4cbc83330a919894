"""The rate limiter's window in Redis, shared by every replica that calls Clerk with the same key."""

from __future__ import annotations

import contextlib

from service.redis_link import REDIS_FAILURES, REDIS_RETRY_SECONDS, RedisLink

# KEYS: the window (a list of grant times in µs, newest first), the hold.
# ARGV: limit, window in µs. Returns 0, or the µs until a slot may be free.
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local held = redis.call('PTTL', KEYS[2])
if held > 0 then
    return held * 1000
end
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local last = redis.call('LINDEX', KEYS[1], limit - 1)
if last and tonumber(last) > now - window then
    return tonumber(last) + window - now
end
redis.call('LPUSH', KEYS[1], now)
redis.call('LTRIM', KEYS[1], 0, limit - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return 0
"""

# KEYS: the hold. ARGV: its length in ms. A longer hold already set stays.
_HOLD = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
end
return 0
"""


class RedisWindow:
    """The moving window in Redis, shared by every replica that uses the same key prefix."""

    def __init__(self, url: str, limit: int, seconds: float, prefix: str) -> None:
        """``limit`` slots in every ``seconds``, under keys starting with ``prefix``, in the Redis at ``url``."""
        self._link = RedisLink(url, "rate_limit")
        client = self._link.client
        self._limit = limit
        self._window_us = int(seconds * 1_000_000)
        self._keys = [f"{prefix}:window", f"{prefix}:hold"]
        self._take = client.register_script(_TAKE)
        self._hold = client.register_script(_HOLD)

    @property
    def available(self) -> bool:
        """Whether Redis answered the last command."""
        return self._link.available

    async def take(self) -> float:
        """Take a slot, or say how long until one may be free (also while Redis is unreachable)."""
        try:
            wait_us = int(await self._take(keys=self._keys, args=[self._limit, self._window_us]))
        except REDIS_FAILURES as exc:
            self._link.failed(exc)
            return REDIS_RETRY_SECONDS
        self._link.answered()
        return wait_us / 1_000_000

    async def hold(self, seconds: float) -> None:
        """Give no slot, on any replica, for ``seconds``."""
        with contextlib.suppress(*REDIS_FAILURES):
            await self._hold(keys=self._keys[1:], args=[max(1, int(seconds * 1000))])

    async def close(self) -> None:
        """Close the client."""
        await self._link.close()
