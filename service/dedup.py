"""The idempotency store: final answers remembered by publisher and ``message_id``.

A request whose key already had a final answer (``created``,
``user_not_found``, ``upstream_rejected``) within the window gets that
answer again without a second call to Clerk, but only when it is the same
request: each answer is kept with the body sent to Clerk, and a key reused
for another user, expiry or organization is refused instead (as payment
APIs treat their idempotency keys), so a key can never return the token of
another request. Requests with the same key that arrive together are
serialised, so only the first calls Clerk. Retryable failures are not
remembered. The key includes the publisher, so one publisher can never
receive another's result; callers without a ``user_id`` property share one
namespace, and the request check is what keeps them apart.

The store is in-process and bounded by time and by bytes: answers are kept
encoded (MessagePack), and each entry is counted at its size plus the
bookkeeping around it. A store shared by replicas can take its place behind
the same methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, NamedTuple

from cachetools import TTLCache

from service.messages import MSGPACK, Reply, decode_reply, encode_reply

IdempotencyKey = tuple[str, str]

# An entry's memory, as tracemalloc measures it (tests/unit/test_dedup_logs_upstream.py):
# about 600 bytes of bookkeeping (tuples, the cache's dict slot and expiry link)
# and, with allocator slack, up to 1.5 times its strings. Counted on the safe side.
ENTRY_OVERHEAD_BYTES: Final = 600
PAYLOAD_FACTOR: Final = 1.5


class Remembered(NamedTuple):
    """A final answer and the request it answered."""

    request: bytes
    reply: Reply


class _Entry(NamedTuple):
    request: bytes
    reply: bytes
    size: int


def idempotency_key(publisher: str | None, message_id: str | None) -> IdempotencyKey | None:
    """The store's key for a request, or None when it has no ``message_id``."""
    if not message_id:
        return None
    return (publisher or "", message_id)


def _entry_size(entry: _Entry) -> int:
    return entry.size


class IdempotencyStore:
    """Final replies by key, for a window of time, in at most ``max_bytes``."""

    def __init__(self, window_seconds: float, max_bytes: int) -> None:
        """An empty store; a window of 0 remembers nothing."""
        self._enabled = window_seconds > 0
        self._replies: TTLCache[IdempotencyKey, _Entry] = TTLCache(
            maxsize=max_bytes,
            ttl=max(window_seconds, 1e-9),
            timer=time.monotonic,
            getsizeof=_entry_size,
        )
        self._locks: dict[IdempotencyKey, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def claim(self, key: IdempotencyKey | None) -> AsyncIterator[Remembered | None]:
        """Hold ``key`` for one request; yields the remembered answer, if any."""
        if key is None or not self._enabled:
            yield None
            return
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                entry = self._replies.get(key)
                yield None if entry is None else Remembered(entry.request, decode_reply(entry.reply, MSGPACK))
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def remember(self, key: IdempotencyKey | None, request: bytes, reply: Reply) -> None:
        """Keep a final reply to ``request`` for the window (unless it alone exceeds the store)."""
        if key is None or not self._enabled:
            return
        encoded = encode_reply(reply, MSGPACK)
        # cachetools sizes an entry by its value: the key's strings are counted in it too.
        payload = len(key[0]) + len(key[1]) + len(request) + len(encoded)
        size = ENTRY_OVERHEAD_BYTES + int(PAYLOAD_FACTOR * payload)
        if size <= self._replies.maxsize:
            self._replies[key] = _Entry(request, encoded, size)

    def forget(self, key: IdempotencyKey | None) -> None:
        """Drop a remembered reply (its token was revoked)."""
        if key is not None:
            self._replies.pop(key, None)

    @property
    def size_bytes(self) -> int:
        """The bytes counted for the live entries."""
        self._replies.expire()
        return int(self._replies.currsize)

    def __len__(self) -> int:
        """How many replies are remembered now."""
        self._replies.expire()
        return len(self._replies)
