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

Every token has one fate: delivered to the caller that asked, or revoked.
So a request holds its key (a ``Claim``) from before Clerk is called until
its reply's fate is known, not only until its answer is stored:

- ``found``: what the key holds. ``NEW``: this request calls Clerk.
  ``ANSWERED``: a final answer whose reply was delivered, sent again.
  ``UNSETTLED``: a final answer whose holder stopped before it knew its
  reply's fate (a crash, a lost connection): sent again, but a refusal of
  this copy's reply revokes nothing, since the first may have arrived.
  ``SPENT``: the answer has left the window while its token may still live
  (an id-only record kept for the token's lifetime): not created again.
- ``remember`` stores this request's answer before its reply is published
  (a redelivery after a lost confirm gets the same token);
- then ``delivered`` (the reply was confirmed) or ``withdraw`` (it was
  refused: the answer is dropped unless a copy delivered it meanwhile, and
  its token is revoked only when dropped). A copy that waited for the key
  then reads a delivered answer, or makes a fresh call; never a token that
  is revoked after it was given.

Two stores keep this promise behind one interface (``IdempotencyStore``):

- ``MemoryIdempotencyStore``, in process, bounded by time and by bytes:
  each entry is counted at the size of its strings plus the bookkeeping
  around it, on the safe side of what tracemalloc measures. One replica;
  a claim is a lock.
- ``RedisIdempotencyStore`` (``service.dedup._redis``) when REDIS_URL is
  set, shared by every replica: a claim is a lease with a fence (a token of
  its own), renewed while held; a replica paused past its lease finds the
  fence moved when it comes back and may not store its answer
  (``ClaimLostError``): it revokes its token and answers with the stored
  one.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from operator import attrgetter
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

import msgspec
from cachetools import TTLCache

from service.errors import ServiceError
from service.messages import Created, Reply

if TYPE_CHECKING:
    from service.config import Settings
    from service.redis_link import RedisLink

IdempotencyKey = tuple[str, str]

# An entry's memory, fitted to what tracemalloc measures (tests/unit/test_dedup_logs_upstream.py
# checks it): the entry's tuple, the key's tuple and strings, the dict slot and expiry link, and
# the bytes of the packed answer.
ENTRY_OVERHEAD_BYTES: Final = 464
STRING_OVERHEAD_BYTES: Final = 49
# The keys of created tokens kept past the window, in process: two integers each, counted at
# SPENT_ENTRY_BYTES (tracemalloc measures 80 to 150 bytes as the dict fills).
MAX_SPENT_IDS: Final = 50_000
SPENT_ENTRY_BYTES: Final = 150
# A record's value sits above its expiry (monotonic seconds) in one integer.
EXPIRY_BITS: Final = 40


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


class ClaimLostError(ServiceError):
    """Another request took this request's key while it was held (its lease ran out meanwhile).

    ``answer`` is what the store holds for the key now (the other request's answer), or None
    while the other request is still working on it.
    """

    def __init__(self, answer: Remembered | None) -> None:
        """Carry the answer the store holds."""
        super().__init__("the idempotency key was claimed by another request")
        self.answer = answer


class Found(enum.Enum):
    """What a claim found under its key."""

    # Nothing: this request calls Clerk.
    NEW = "new"
    # A final answer whose reply was delivered.
    ANSWERED = "answered"
    # A final answer whose reply's fate is unknown (its holder stopped or lost its connection first).
    UNSETTLED = "unsettled"
    # An answer that has left the window while its token may still be live: only its id is left.
    SPENT = "spent"


class Claim(Protocol):
    """One request's hold on its key, from before Clerk is called until its reply's fate is known."""

    @property
    def found(self) -> Found:
        """What the claim found under the key."""
        ...

    @property
    def remembered(self) -> Remembered | None:
        """The answer found (``ANSWERED`` and ``UNSETTLED``)."""
        ...

    async def remember(self, request: bytes, reply: Reply, lifetime_seconds: int, context: object = None) -> None:
        """Store this request's final answer under the key, if the claim still holds it; else ClaimLostError.

        A created token's id is kept ``lifetime_seconds`` (the token's) beyond the window, as SPENT.
        ``context``: what the caller needs to settle the answer later (the in-process store keeps it
        while the answer is unsettled, see ``MemoryIdempotencyStore.unsettled``).
        """
        ...

    def publishing(self) -> None:
        """The answer's reply is about to be published: from now on a caller may hold it."""
        ...

    async def delivered(self) -> None:
        """The answer's reply was confirmed: it is the key's for the window."""
        ...

    async def withdraw(self) -> bool:
        """The reply of this request's own answer was refused: drop the answer unless it was delivered.

        True when it was dropped: nobody can have been given its token, which the caller revokes.
        """
        ...


class NoClaim:
    """The claim of a request without a key (no ``message_id``, or no window): it finds nothing, keeps nothing."""

    found = Found.NEW
    remembered: Remembered | None = None

    async def remember(self, request: bytes, reply: Reply, lifetime_seconds: int, context: object = None) -> None:
        """Nothing is kept."""

    def publishing(self) -> None:
        """Nothing is kept."""

    async def delivered(self) -> None:
        """Nothing is kept."""

    async def withdraw(self) -> bool:
        """The token was this request's alone: revoke it."""
        return True


class Unrelated(NoClaim):
    """The claim a reply answers when it is not its key's answer (another request's, delivered; a refusal).

    It settles nothing: its key's answer belongs to another request, which decides its fate.
    """

    async def withdraw(self) -> bool:
        """Not this request's token: never revoked for it."""
        return False


NO_CLAIM: Final = NoClaim()
UNRELATED: Final = Unrelated()


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


def idempotency_key(publisher: str | None, message_id: str | None, reply_to: str) -> IdempotencyKey | None:
    """The store's key for a request, or None when it has no ``message_id``.

    A key is scoped to its publisher. Nameless requests have none to share: theirs is scoped to
    ``reply_to`` as well, so a guessed ``message_id`` answers only into the queue that asked (the
    first caller's own), never a second caller's.
    """
    if not message_id:
        return None
    if publisher:
        return (publisher, message_id)
    return ("", f"{message_id}\x1f{reply_to}")


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

    def claim(self, key: IdempotencyKey | None, deadline: float | None = None) -> AbstractAsyncContextManager[Claim]:
        """Hold ``key`` for one request until the block ends: its answer, and its reply's fate.

        DeadlineExceededError when ``deadline`` (Unix seconds) passes while another holds it.
        """
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
        self.remembered = None if self._entry is None else unpack(self._entry.packed)
        if self._entry is not None:
            self.found = Found.ANSWERED if self._entry.delivered else Found.UNSETTLED
        elif store.spent.get(digest64(*key)) is not None:
            self.found = Found.SPENT
        else:
            self.found = Found.NEW

    async def remember(self, request: bytes, reply: Reply, lifetime_seconds: int, context: object = None) -> None:
        """Keep the answer (unless it alone exceeds the store)."""
        packed = pack(request, reply)
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
            remembered = unpack(entry.packed)
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


def open_store(settings: Settings) -> IdempotencyStore:
    """The store the settings ask for: in Redis with REDIS_URL, else in this process."""
    if settings.redis_url is None:
        return MemoryIdempotencyStore(settings.idempotency_window_seconds, settings.idempotency_max_bytes)
    # Imported only when used, as the rate limiter's Redis window is.
    from service.dedup._redis import RedisIdempotencyStore  # noqa: PLC0415

    return RedisIdempotencyStore(
        settings.redis_url,
        settings.idempotency_window_seconds,
        settings.key_id(),
        settings.idempotency_lease_seconds,
    )
