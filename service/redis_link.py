"""One Redis client, and whether Redis answered its last command.

The rate limiter's window and the idempotency store each hold one link.
While Redis cannot be reached, their callers wait rather than guess (no
slot is given, no claim is made), the link says so once in the log, and
the worker pauses consumption and reports not-ready until every link
answers again (it asks with ``check``).
"""

from __future__ import annotations

from typing import Final

import redis
import redis.asyncio
import structlog

REDIS_TIMEOUT_SECONDS: Final = 2.0
# While Redis is unreachable, how often a waiting caller asks again.
REDIS_RETRY_SECONDS: Final = 0.5
# What a command to Redis raises when Redis is away (timeouts included).
REDIS_FAILURES: Final = (redis.RedisError, OSError)

log = structlog.get_logger(__name__)


class RedisLink:
    """A client for the Redis at ``url``, used for ``purpose`` (named in the log)."""

    def __init__(self, url: str, purpose: str) -> None:
        """Make the client; it connects at its first command."""
        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self.purpose = purpose
        self.available = True

    def failed(self, exc: BaseException) -> None:
        """A command failed: Redis is away or refuses us (said once until it answers again).

        Redis's error text is logged (a refused ACL permission says which command): it names
        commands and addresses, never the password.
        """
        if self.available:
            log.error(
                "redis_unavailable",
                used_for=self.purpose,
                error=type(exc).__name__,
                reason=str(exc)[:300],
                action="waiting for it; nothing is lost",
            )
        self.available = False

    def answered(self) -> None:
        """A command succeeded."""
        if not self.available:
            log.info("redis_available", used_for=self.purpose)
        self.available = True

    async def check(self) -> bool:
        """Ask Redis (PING) whether it answers; returns and records the answer."""
        try:
            await self.client.ping()
        except REDIS_FAILURES as exc:
            self.failed(exc)
        else:
            self.answered()
        return self.available

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()
