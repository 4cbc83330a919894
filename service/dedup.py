"""The idempotency store: final answers remembered by publisher and ``message_id``.

A request whose key already had a final answer (``created``,
``user_not_found``, ``upstream_rejected``) within the window gets that
answer again without a second call to Clerk. Requests with the same key
that arrive together are serialised, so only the first calls Clerk.
Retryable failures are not remembered. The key includes the publisher, so
one publisher can never receive another's result.

The store is in-process and bounded (entries and time); a store shared by
replicas can take its place behind the same three methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cachetools import TTLCache

from service.messages import Reply

IdempotencyKey = tuple[str, str]


def idempotency_key(publisher: str | None, message_id: str | None) -> IdempotencyKey | None:
    """The store's key for a request, or None when it has no ``message_id``."""
    if not message_id:
        return None
    return (publisher or "", message_id)


class IdempotencyStore:
    """Final replies by key, for a window of time, at most ``max_entries`` of them."""

    def __init__(self, window_seconds: float, max_entries: int) -> None:
        """An empty store; a window of 0 remembers nothing."""
        self._enabled = window_seconds > 0
        self._replies: TTLCache[IdempotencyKey, Reply] = TTLCache(
            maxsize=max_entries,
            ttl=max(window_seconds, 1e-9),
            timer=time.monotonic,
        )
        self._locks: dict[IdempotencyKey, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def claim(self, key: IdempotencyKey | None) -> AsyncIterator[Reply | None]:
        """Hold ``key`` for one request; yields the remembered reply, if any."""
        if key is None or not self._enabled:
            yield None
            return
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield self._replies.get(key)
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def remember(self, key: IdempotencyKey | None, reply: Reply) -> None:
        """Keep a final reply for the window."""
        if key is not None and self._enabled:
            self._replies[key] = reply

    def forget(self, key: IdempotencyKey | None) -> None:
        """Drop a remembered reply (its token was revoked)."""
        if key is not None:
            self._replies.pop(key, None)

    def __len__(self) -> int:
        """How many replies are remembered now."""
        return len(self._replies)
