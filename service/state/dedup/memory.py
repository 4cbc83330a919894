"""The in-process idempotency store: one replica's, bounded by time and by bytes; a claim is a lock."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

import nacl.utils
from cachetools import TTLCache
from sign_in_tokens_client.contract.messages import Created, Reply

from service.state.dedup import (
    ENTRY_OVERHEAD_BYTES,
    EXPIRY_BITS,
    MAX_SPENT_IDS,
    SPENT_ENTRY_BYTES,
    STRING_OVERHEAD_BYTES,
    Claim,
    Found,
    IdempotencyKey,
    KeyLocks,
    NoClaim,
    Remembered,
    pack,
    unpack,
)
from service.state.dedup.cipher import KEY_BYTES, AnswerCipher

if TYPE_CHECKING:
    from service.state.redis_link import RedisLink


class _Entry(NamedTuple):
    packed: bytes
    size: int
    delivered: bool
    # Until delivered: whether its reply was published (a caller may hold it), and its claim's context.
    published: bool = False
    context: object = None


def entry_size(key: IdempotencyKey, packed: bytes) -> int:
    """The bytes an entry is counted at."""
    return ENTRY_OVERHEAD_BYTES + STRING_OVERHEAD_BYTES * 3 + sum(len(s) for s in key) + len(packed)


def digest64(*parts: str) -> int:
    """Strings as 64 bits, for records kept in this process (a collision would need 2**32 of them)."""
    text = "\0".join(parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class ExpiringIds:
    """The last ``max_entries`` ids recorded, each with its own expiry (monotonic seconds), as integers.

    A plain dict, oldest first (an id recorded again moves to the end): about 100 bytes an entry.
    """

    def __init__(self, max_entries: int) -> None:
        """An empty record."""
        self._max_entries = max_entries
        self._expiry: dict[int, int] = {}

    def add(self, key: int, lifetime_seconds: float, value: int = 0) -> None:
        """Record ``key`` (with a small ``value``) for ``lifetime_seconds``; the oldest go past the bound."""
        self._expiry.pop(key, None)
        self._expiry[key] = value << EXPIRY_BITS | int(time.monotonic() + lifetime_seconds)
        while len(self._expiry) > self._max_entries:
            del self._expiry[next(iter(self._expiry))]

    def get(self, key: int) -> int | None:
        """The value recorded with ``key`` while it lives, else None."""
        entry = self._expiry.get(key)
        if entry is None or entry & ((1 << EXPIRY_BITS) - 1) <= time.monotonic():
            return None
        return entry >> EXPIRY_BITS

    def discard(self, key: int) -> None:
        """Forget ``key``."""
        self._expiry.pop(key, None)

    def __len__(self) -> int:
        """How many ids are recorded (expired ones included until pushed out)."""
        return len(self._expiry)


class _MemoryClaim:
    """A claim in this process: the key's lock is held, so no other request can take the key.

    The entry it found or wrote is known by identity: another entry under the key is another answer.
    """

    def __init__(self, store: MemoryIdempotencyStore, key: IdempotencyKey) -> None:
        self._store = store
        self._key = key
        self._entry = store.replies.get(key)
        self.remembered = None if self._entry is None else unpack(self._entry.packed, store.cipher)
        if self._entry is not None:
            self.found = Found.ANSWERED if self._entry.delivered else Found.UNSETTLED
        elif store.spent.get(digest64(*key)) is not None:
            self.found = Found.SPENT
        else:
            self.found = Found.NEW

    async def remember(self, request: bytes, reply: Reply, lifetime_seconds: int, context: object = None) -> None:
        """Keep the answer (unless it alone exceeds the store)."""
        packed = pack(request, reply, self._store.cipher)
        size = entry_size(self._key, packed)
        self._entry = _Entry(packed, size, delivered=False, context=context)
        if size <= self._store.replies.maxsize:
            self._store.replies[self._key] = self._entry
        if isinstance(reply, Created):
            self._store.spent.add(digest64(*self._key), lifetime_seconds)

    def publishing(self) -> None:
        """Mark the answer published (its fate unknown until delivered)."""
        entry = self._store.replies.get(self._key)
        if entry is not None and entry is self._entry and not entry.published:
            self._entry = entry._replace(published=True)
            self._store.replies[self._key] = self._entry

    async def delivered(self) -> None:
        """Mark the answer delivered (its context is no longer needed)."""
        entry = self._store.replies.get(self._key)
        if entry is not None and entry is self._entry and not entry.delivered:
            self._store.replies[self._key] = entry._replace(delivered=True, context=None)

    async def withdraw(self) -> bool:
        """Drop the answer unless it was delivered (one evicted meanwhile was given to nobody)."""
        entry = self._store.replies.get(self._key)
        if entry is not None and (entry is not self._entry or entry.delivered):
            return False
        self._store.forget(self._key)
        return True


class Unsettled(NamedTuple):
    """An answer in this process whose reply was not confirmed delivered."""

    key: IdempotencyKey
    remembered: Remembered
    published: bool
    context: object


class MemoryIdempotencyStore:
    """Final replies by key, in this process, for a window of time, in at most ``max_bytes``."""

    def __init__(self, window_seconds: float, max_bytes: int, max_spent: int = MAX_SPENT_IDS) -> None:
        """An empty store; a window of 0 remembers nothing."""
        self._enabled = window_seconds > 0
        self.replies: TTLCache[IdempotencyKey, _Entry] = TTLCache(
            maxsize=max_bytes,
            ttl=max(window_seconds, 1e-9),
            timer=time.monotonic,
            getsizeof=attrgetter("size"),
        )
        # The keys of created tokens, for their lifetime: a request that comes after the window is not served blindly.
        self.spent = ExpiringIds(max_spent)
        self.locks = KeyLocks()
        # Answers held encrypted under a key of this process's own (no other process reads them).
        self.cipher = AnswerCipher([nacl.utils.random(KEY_BYTES)])
        self.available = True
        self.redis: RedisLink | None = None

    @asynccontextmanager
    async def claim(self, key: IdempotencyKey | None, deadline: float | None = None) -> AsyncIterator[Claim]:
        """Hold ``key`` for one request until the block ends.

        Only this process's requests can hold a key here: the wait for one is short, and ``deadline`` is not needed.
        """
        del deadline
        if key is None or not self._enabled:
            yield NoClaim()
            return
        async with self.locks.hold(key):
            yield _MemoryClaim(self, key)

    async def close(self) -> None:
        """Nothing to release."""

    def unsettled(self) -> list[Unsettled]:
        """The created tokens whose answers are not delivered: at a stop they die with this process.

        Those never published can be revoked (their requests go back to their queues and will be
        answered with new tokens); those published may have reached their callers.
        """
        found = []
        for key, entry in list(self.replies.items()):
            if entry.delivered:
                continue
            remembered = unpack(entry.packed, self.cipher)
            if isinstance(remembered.reply, Created):
                found.append(Unsettled(key, remembered, entry.published, entry.context))
        return found

    def forget(self, key: IdempotencyKey) -> None:
        """Drop ``key``'s answer and its id-only record."""
        self.replies.pop(key, None)
        self.spent.discard(digest64(*key))

    @property
    def answers_bytes(self) -> int:
        """The bytes counted for the live answers (what IDEMPOTENCY_MAX_BYTES bounds)."""
        self.replies.expire()
        return int(self.replies.currsize)

    @property
    def size_bytes(self) -> int:
        """The bytes counted for the live answers and the id-only records."""
        return self.answers_bytes + SPENT_ENTRY_BYTES * len(self.spent)

    def __len__(self) -> int:
        """How many replies are remembered now."""
        self.replies.expire()
        return len(self.replies)
