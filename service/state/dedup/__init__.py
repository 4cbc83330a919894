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

Answers hold their token encrypted (``cipher.py``, NaCl's ``SecretBox``; contract v3): in process
under a key of the process's own, in Redis under one every replica derives from its sealing key.

Two stores keep this promise behind one interface (``IdempotencyStore``):

- ``MemoryIdempotencyStore`` (``service.state.dedup.memory``), in process, bounded by time and bytes:
  each entry is counted at the size of its strings plus the bookkeeping
  around it, on the safe side of what tracemalloc measures. One replica;
  a claim is a lock.
- ``RedisIdempotencyStore`` (``service.state.dedup._redis``) when REDIS_URL is
  set, shared by every replica: a claim is a lease with a fence (a token of
  its own), renewed while held; a replica paused past its lease finds the
  fence moved when it comes back and may not store its answer
  (``ClaimLostError``): it revokes its token and answers with the stored
  one.
"""

from __future__ import annotations

import asyncio
import enum
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

import msgspec
from sign_in_tokens_client.connection import DEFAULT_INSTANCE
from sign_in_tokens_client.contract.errors import ServiceError
from sign_in_tokens_client.contract.messages import Created, Reply, created

from service.state.dedup.cipher import AnswerCipher, AnswerUnreadableError

if TYPE_CHECKING:
    from service.config import Settings
    from service.state.redis_link import RedisLink

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
# What an encrypted answer starts with (then the SecretBox's nonce and ciphertext of a packed one).
_ENCRYPTED: Final = b"\x02"
_ZLIB: Final = 0x78


def pack(request: bytes, reply: Reply, cipher: AnswerCipher | None = None) -> bytes:
    """An answer as the stores keep it: one bytes object, MessagePack, the token kept once; encrypted with ``cipher``.

    A created token's URL repeats the token (its ticket): the URL is kept as what surrounds the
    token, 0.8 KB packed instead of 1.5. Deflate made 0.67 KB, but cost 35 µs a token inside the
    worker against 1 µs for the string search. ``SecretBox`` adds 41 bytes (its nonce and tag, and
    our mark).
    """
    stored = _Stored(request, reply)
    if isinstance(reply, Created):
        token = reply.token_object
        before, found, after = token.url.partition(token.token) if token.url and token.token else ("", "", "")
        if found:
            stored = _Stored(request, created(msgspec.structs.replace(token, url=None)), (before, after))
    packed = _PACKED + _encoder.encode(stored)
    return packed if cipher is None else _ENCRYPTED + cipher.encrypt(packed)


def unpack(packed: bytes | memoryview, cipher: AnswerCipher | None = None) -> Remembered:
    """The answer ``pack`` made (or an earlier version's: deflated, or in clear); AnswerUnreadableError.

    AnswerUnreadableError: encrypted, and ``cipher`` does not open it (a key rolled away, or none).
    """
    if packed[0] == _ENCRYPTED[0]:
        if cipher is None:
            msg = "a stored answer is encrypted and this worker has no REPLY_SEALING_KEY_FILE"
            raise AnswerUnreadableError(msg)
        packed = cipher.decrypt(bytes(packed[1:]))
    stored = _decoder.decode(zlib.decompress(packed) if packed[0] == _ZLIB else packed[1:])
    reply = stored.reply
    if stored.url_around_token is not None and isinstance(reply, Created):
        token = reply.token_object
        before, after = stored.url_around_token
        reply = created(msgspec.structs.replace(token, url=before + token.token + after))
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


def idempotency_key(
    publisher: str | None, message_id: str | None, reply_to: str, *, state: str | None = None
) -> IdempotencyKey | None:
    """The store's key for a request, or None when it has no ``message_id``.

    A key is scoped to its publisher. Nameless requests have none to share: theirs is scoped to
    ``reply_to`` as well, so a guessed ``message_id`` answers only into the queue that asked (the
    first caller's own), never a second caller's. And to its Clerk instance (its ``state`` id): one
    ``message_id`` sent to two instances is two requests (the ``default`` state's keys are as they
    always were).
    """
    if not message_id:
        return None
    if state not in (None, DEFAULT_INSTANCE):
        message_id = f"{message_id}\x1e{state}"
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


def open_store(settings: Settings, cipher: Callable[[], AnswerCipher | None] = lambda: None) -> IdempotencyStore:
    """The store the settings ask for: in Redis with REDIS_URL, else in this process.

    ``cipher``: what encrypts the answers kept in Redis (the worker's, from its sealing key); those
    kept in process are encrypted under a key of the process's own.
    """
    if settings.redis_url is None:
        from service.state.dedup.memory import MemoryIdempotencyStore  # noqa: PLC0415 - it imports this module

        return MemoryIdempotencyStore(settings.idempotency_window_seconds, settings.idempotency_max_bytes)
    # Imported only when used, as the rate limiter's Redis window is.
    from service.state.dedup._redis import RedisIdempotencyStore  # noqa: PLC0415

    return RedisIdempotencyStore(
        settings.redis_url, settings.idempotency_window_seconds, settings.idempotency_lease_seconds, cipher
    )
