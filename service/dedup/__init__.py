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

Two stores keep this promise behind one interface (``IdempotencyStore``):

- ``MemoryIdempotencyStore``, in process, bounded by time and by bytes:
  each entry is counted at the size of its strings plus the bookkeeping
  around it, on the safe side of what tracemalloc measures. One replica.
- ``RedisIdempotencyStore`` (``service.dedup._redis``) when REDIS_URL is
  set, shared by every replica: a claim takes a lease on the key before
  Clerk is called, so replicas handling one ``message_id`` at once make one
  call; the answer replaces the lease before the reply is published; a
  replica that dies leaves a lease that expires.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from operator import attrgetter
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

import msgspec
from cachetools import TTLCache

from service.messages import Created, Reply

if TYPE_CHECKING:
    from service.config import Settings
    from service.redis_link import RedisLink

IdempotencyKey = tuple[str, str]

# An entry's memory, fitted to what tracemalloc measures (tests/unit/test_dedup_logs_upstream.py
# checks it): the entry's tuple, the key's tuple and strings, the dict slot and expiry link, and
# the bytes of the packed answer.
ENTRY_OVERHEAD_BYTES: Final = 440
STRING_OVERHEAD_BYTES: Final = 49


class Remembered(NamedTuple):
    """A final answer and the request it answered."""

    request: bytes
    reply: Reply


class _Stored(msgspec.Struct, array_like=True):
    request: bytes
    reply: Reply
    # A created token's URL with the token cut out (it holds it, as its ticket), or None.
    url_around_token: tuple[str, str] | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Stored)
# What a packed answer starts with; the answers of earlier versions are zlib streams (0x78).
_PACKED: Final = b"\x01"
_ZLIB: Final = 0x78


def pack(request: bytes, reply: Reply) -> bytes:
    """An answer as the stores keep it: one bytes object, MessagePack, the token kept once.

    A created token's URL repeats the token (its ticket): the URL is kept as what surrounds the
    token, 0.8 KB packed instead of 1.5. Deflate made 0.67 KB, but cost 35 µs a token inside the
    worker against 1 µs for the string search.
    """
    if isinstance(reply, Created):
        token = reply.sign_in_token
        before, found, after = token.url.partition(token.token) if token.url and token.token else ("", "", "")
        if found:
            without_url = Created(sign_in_token=msgspec.structs.replace(token, url=None))
            return _PACKED + _encoder.encode(_Stored(request, without_url, (before, after)))
    return _PACKED + _encoder.encode(_Stored(request, reply))


def unpack(packed: bytes | memoryview) -> Remembered:
    """The answer ``pack`` made (or an earlier version, deflated)."""
    stored = _decoder.decode(zlib.decompress(packed) if packed[0] == _ZLIB else packed[1:])
    reply = stored.reply
    if stored.url_around_token is not None and isinstance(reply, Created):
        token = reply.sign_in_token
        before, after = stored.url_around_token
        reply = Created(sign_in_token=msgspec.structs.replace(token, url=before + token.token + after))
    return Remembered(stored.request, reply)


class _Entry(NamedTuple):
    packed: bytes
    size: int


def entry_size(key: IdempotencyKey, packed: bytes) -> int:
    """The bytes an entry is counted at."""
    return ENTRY_OVERHEAD_BYTES + STRING_OVERHEAD_BYTES * 3 + sum(len(s) for s in key) + len(packed)


def idempotency_key(publisher: str | None, message_id: str | None) -> IdempotencyKey | None:
    """The store's key for a request, or None when it has no ``message_id``."""
    if not message_id:
        return None
    return (publisher or "", message_id)


class IdempotencyStore(Protocol):
    """Where final answers are remembered."""

    @property
    def available(self) -> bool:
        """Whether the store can be reached now."""
        ...

    @property
    def redis(self) -> RedisLink | None:
        """The link to Redis, for a store kept there."""
        ...

    def claim(
        self, key: IdempotencyKey | None, deadline: float | None = None
    ) -> AbstractAsyncContextManager[Remembered | None]:
        """Hold ``key`` for one request; yields the remembered answer, if any.

        DeadlineExceededError when ``deadline`` (Unix seconds) passes while another holds it.
        """
        ...

    async def remember(self, key: IdempotencyKey | None, request: bytes, reply: Reply) -> None:
        """Keep the final reply to ``request`` for the window (before the reply is published)."""
        ...

    async def forget(self, key: IdempotencyKey | None) -> None:
        """Drop a remembered reply (its token was revoked)."""
        ...

    async def close(self) -> None:
        """Release what the store holds."""
        ...


class KeyLocks:
    """One lock per key in use, so that requests with one key in this process take turns."""

    def __init__(self) -> None:
        """No key held."""
        self._locks: dict[IdempotencyKey, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: IdempotencyKey) -> AsyncIterator[None]:
        """Hold ``key`` for the block."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        """How many keys are held or waited for."""
        return len(self._locks)


class MemoryIdempotencyStore:
    """Final replies by key, in this process, for a window of time, in at most ``max_bytes``."""

    def __init__(self, window_seconds: float, max_bytes: int) -> None:
        """An empty store; a window of 0 remembers nothing."""
        self._enabled = window_seconds > 0
        self._replies: TTLCache[IdempotencyKey, _Entry] = TTLCache(
            maxsize=max_bytes,
            ttl=max(window_seconds, 1e-9),
            timer=time.monotonic,
            getsizeof=attrgetter("size"),
        )
        self.locks = KeyLocks()
        self.available = True
        self.redis: RedisLink | None = None

    @asynccontextmanager
    async def claim(
        self, key: IdempotencyKey | None, deadline: float | None = None
    ) -> AsyncIterator[Remembered | None]:
        """Hold ``key`` for one request; yields the remembered answer, if any.

        Only this process's requests can hold a key here: the wait for one is short, and ``deadline`` is not needed.
        """
        del deadline
        if key is None or not self._enabled:
            yield None
            return
        async with self.locks.hold(key):
            entry = self._replies.get(key)
            yield None if entry is None else unpack(entry.packed)

    async def remember(self, key: IdempotencyKey | None, request: bytes, reply: Reply) -> None:
        """Keep a final reply to ``request`` for the window (unless it alone exceeds the store)."""
        if key is None or not self._enabled:
            return
        # cachetools sizes an entry by its value: the key's strings are counted in it too.
        packed = pack(request, reply)
        size = entry_size(key, packed)
        if size <= self._replies.maxsize:
            self._replies[key] = _Entry(packed, size)

    async def forget(self, key: IdempotencyKey | None) -> None:
        """Drop a remembered reply (its token was revoked)."""
        if key is not None:
            self._replies.pop(key, None)

    async def close(self) -> None:
        """Nothing to release."""

    @property
    def size_bytes(self) -> int:
        """The bytes counted for the live entries."""
        self._replies.expire()
        return int(self._replies.currsize)

    def __len__(self) -> int:
        """How many replies are remembered now."""
        self._replies.expire()
        return len(self._replies)


def open_store(settings: Settings) -> IdempotencyStore:
    """The store the settings ask for: in Redis with REDIS_URL, else in this process."""
    if settings.redis_url is None:
        return MemoryIdempotencyStore(settings.idempotency_window_seconds, settings.idempotency_max_bytes)
    # Imported only when used, as the rate limiter's Redis window is.
    from service.dedup._redis import RedisIdempotencyStore  # noqa: PLC0415

    return RedisIdempotencyStore(settings.redis_url, settings.idempotency_window_seconds, settings.key_id())
