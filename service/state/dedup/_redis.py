"""The idempotency store in Redis, shared by every replica that calls Clerk with the same key.

Each request key is one Redis hash (and, for a created token, an id-only
record beside it). Its fields:

- ``owner``: the fence of the claim that holds the key, a token made for
  each claim (not each process), and ``until``: when its lease ends, on
  Redis's clock (ms). A claim sets both when the key is free: no owner, or
  an owner whose lease has ended. While held, one task renews every lease
  this store holds; a replica that dies stops renewing, and its lease ends
  within ``lease_seconds``.
- ``answer`` (the packed request and reply), ``tag`` (a created token's id,
  else the error's code) and ``delivered``: written by ``remember`` only
  while ``owner`` is the writer's fence (or the key is gone, when nobody
  else can have called Clerk), so a claim that lost its lease while paused
  cannot write over another's answer; it reads that answer only once it was
  delivered (else it claims again, and waits). The hash lives while its
  holder works (at least a lease past each renewal), then for the window
  from the answer's delivery (or its release, unsettled).

The id-only record (``...:spent``, a hash: the token's ``tag``, and
``delivered``) keeps a created token's key for the token's lifetime: a
request with that ``message_id`` after the window is answered
``invalid_request`` rather than given a second token; and a withdrawal
asked after the window still knows whether the token was delivered.

Every script answers with the fence it was given, so an answer read for
another command (which a link that timed out could deliver) is caught. The
link (service.state.redis_link) sends nothing twice by itself and drops its
connection after a timeout or a cancellation.

Redis keys are a digest of the publisher and ``message_id`` (with the Clerk
instance's state id, but for ``default``'s): never the Clerk key, so a key
rotation keeps the answers. Two deployments sharing one Redis give their
instances different state ids. The store holds tokens: docs/security.md
says how to protect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import redis
import structlog
from sign_in_tokens_client.contract.errors import DeadlineExceededError
from sign_in_tokens_client.contract.messages import Created, Failed, Reply

from service.state.dedup import (
    Claim,
    ClaimLostError,
    Found,
    IdempotencyKey,
    KeyLocks,
    NoClaim,
    Remembered,
    pack,
    unpack,
)
from service.state.dedup.cipher import AnswerCipher, AnswerUnreadableError
from service.state.redis_link import REDIS_FAILURES, REDIS_RETRY_SECONDS, RedisLink

# A claim's default lease, renewed every quarter of it while its request is handled.
LEASE_SECONDS: Final = 5.0
# Polling a key another replica holds: from the first interval, doubling, to the last.
POLL_FIRST_SECONDS: Final = 0.01
POLL_LAST_SECONDS: Final = 0.2
REDIS_KEY_PREFIX: Final = "sign_in_tokens:idempotency"

log = structlog.get_logger(__name__)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the hash, the id-only record. ARGV: the fence, the lease (ms).
# Returns {status, value, fence}: 0 answered (value: answer), 3 unsettled (value: answer, now ours),
# 1 claimed, 4 spent, 2 held by another (value: ms left of its lease).
_CLAIM = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'answer', 'owner', 'until', 'delivered')
local answer, owner, lease_end = f[1], f[2], tonumber(f[3] or '0')
if answer and f[4] then
    return {0, answer, ARGV[1]}
end
if owner and owner ~= ARGV[1] and lease_end > now then
    return {2, tostring(lease_end - now), ARGV[1]}
end
if (not answer) and redis.call('EXISTS', KEYS[2]) == 1 then
    return {4, '', ARGV[1]}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'until', now + tonumber(ARGV[2]))
if answer then
    return {3, answer, ARGV[1]}
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, '', ARGV[1]}
"""
)

# KEYS: hashes. ARGV: the lease (ms), then each hash's fence in KEYS' order. A held key lives at
# least a lease longer (an answer whose fate is not known yet never expires under its holder).
_RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    if redis.call('HGET', key, 'owner') == ARGV[i + 1] then
        redis.call('HSET', key, 'until', now + lease)
        if redis.call('PTTL', key) < lease then
            redis.call('PEXPIRE', key, lease)
        end
    end
end
return 0
"""
)

# KEYS: the hash, the id-only record. ARGV: the fence, the answer, its tag, the window (ms),
# the token's lifetime (s; 0: no id-only record), the lease (ms).
# Returns {1, '', fence} stored (or stored already by this fence); {0, answer, fence} lost to
# another claim whose answer was delivered; {0, '', fence} lost to one whose answer is not (yet).
_REMEMBER = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'answer', 'delivered')
if f[1] and f[1] ~= ARGV[1] then
    if f[2] and f[3] then
        return {0, f[2], ARGV[1]}
    end
    return {0, '', ARGV[1]}
end
if not f[2] then
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'answer', ARGV[2], 'tag', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), tonumber(ARGV[6])))
    if tonumber(ARGV[5]) > 0 then
        redis.call('DEL', KEYS[2])
        redis.call('HSET', KEYS[2], 'tag', ARGV[3])
        redis.call('EXPIRE', KEYS[2], ARGV[5])
    end
end
return {1, '', ARGV[1]}
"""

# KEYS: the hash, the id-only record. ARGV: the fence, the tag delivered, the window (ms).
# The answer is the key's for the window from now; the id-only record notes its token was delivered.
_DELIVERED = """
if redis.call('HGET', KEYS[1], 'tag') == ARGV[2] then
    redis.call('HSET', KEYS[1], 'delivered', '1')
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
if redis.call('HGET', KEYS[2], 'tag') == ARGV[2] then
    redis.call('HSET', KEYS[2], 'delivered', '1')
end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'until', '0')
end
return {1, '', ARGV[1]}
"""

# KEYS: the hash, the id-only record. ARGV: the fence, the tag (a token this claim's request made).
# Returns {1, '', fence}: withdrawn (nobody can have been given it: revoke it), {0, '', fence}: not
# (a copy delivered it, or holds the key with it now and decides its fate). Asked again after a
# lost reply, it answers the same: the answer and its record are gone, and no other claim has it.
_WITHDRAW = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'tag', 'delivered')
local spent = redis.call('HMGET', KEYS[2], 'tag', 'delivered')
if (f[2] == ARGV[2] and f[3]) or (spent[1] == ARGV[2] and spent[2]) then
    return {0, '', ARGV[1]}
end
if f[2] == ARGV[2] and f[1] ~= ARGV[1] then
    return {0, '', ARGV[1]}
end
if f[2] == ARGV[2] then
    redis.call('DEL', KEYS[1])
end
if spent[1] == ARGV[2] then
    redis.call('DEL', KEYS[2])
end
return {1, '', ARGV[1]}
"""

# KEYS: the hash. ARGV: the fence, the window (ms). The key is let go: an answer stays, unsettled,
# for the window (a redelivery takes it over); a bare claim goes.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
    if redis.call('HEXISTS', KEYS[1], 'answer') == 1 then
        redis.call('HSET', KEYS[1], 'until', '0')
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
    else
        redis.call('DEL', KEYS[1])
    end
end
return {1, '', ARGV[1]}
"""


class RedisMixupError(redis.RedisError):
    """Redis's answer names another command's fence: the connection is out of step, and is dropped."""


def _tag(reply: Reply) -> str:
    """What tells one answer from another under a key: a created token's id, else the error's code."""
    if isinstance(reply, Created):
        return reply.token_object.id
    return reply.error.code if isinstance(reply, Failed) else type(reply).__name__


class _RedisClaim:
    """One request's claim: its fence, and what it found."""

    def __init__(self, store: RedisIdempotencyStore, keys: list[str], fence: str) -> None:
        self._store = store
        # The hash and the id-only record.
        self.keys = keys
        self.fence = fence
        self.found = Found.NEW
        self.remembered: Remembered | None = None
        self.tag: str | None = None
        # Whether the key is let go when the block ends (not after a withdrawal or a delivery).
        self.held = True

    async def remember(self, request: bytes, reply: Reply, lifetime_seconds: int, context: object = None) -> None:
        """Store the answer if this claim still holds the key; ClaimLostError otherwise.

        The error carries the other claim's answer once it was delivered; else None (claim again and wait).
        ``context`` is not needed: an unsettled answer outlives this process in Redis.
        """
        del context
        tag = _tag(reply)
        lifetime = lifetime_seconds if isinstance(reply, Created) else 0
        packed = pack(request, reply, self._store.cipher())
        args = [self.fence, packed, tag, self._store.window_ms, lifetime, self._store.lease_ms]
        status, value = await self._store.run_until_answered(self._store.remember_script, self.keys, args)
        if status == 0:
            self._store.let_go(self.keys[0])
            self.held = False
            raise ClaimLostError(self._store.readable(value))
        self.tag = tag

    def publishing(self) -> None:
        """Nothing to mark: a redelivery takes an unsettled answer over, published or not."""

    async def delivered(self) -> None:
        """Mark the answer delivered and let the key go; a failure leaves it unsettled (sent again, never revoked)."""
        self._store.let_go(self.keys[0])
        self.held = False
        if self.tag is None or self.found is Found.ANSWERED:
            return
        try:
            args = [self.fence, self.tag, self._store.window_ms]
            await self._store.run(self._store.delivered_script, self.keys, args)
        except REDIS_FAILURES:
            log.warning("idempotency_delivery_not_recorded", reason="redis_unavailable")

    async def withdraw(self) -> bool:
        """Drop this claim's own answer unless it was delivered; wait for Redis rather than guess."""
        if self.tag is None:
            return False
        status, _ = await self._store.run_until_answered(self._store.withdraw_script, self.keys, [self.fence, self.tag])
        self._store.let_go(self.keys[0])
        self.held = False
        return status == 1


class RedisIdempotencyStore:
    """Final replies by key in Redis, for ``window_seconds``, shared by every replica."""

    def __init__(
        self,
        url: str,
        window_seconds: float,
        lease_seconds: float = LEASE_SECONDS,
        cipher: Callable[[], AnswerCipher | None] = lambda: None,
    ) -> None:
        """A store in the Redis at ``url``; a window of 0 remembers nothing.

        ``cipher``: what encrypts the answers now (None: kept in clear), asked at each use (a SIGHUP rolls it).
        """
        self.cipher = cipher
        self._link = RedisLink(url, "idempotency_store")
        self.redis: RedisLink | None = self._link
        client = self._link.client
        self._enabled = window_seconds > 0
        self.window_ms = max(1, int(window_seconds * 1000))
        self._lease_seconds = lease_seconds
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._prefix = f"{REDIS_KEY_PREFIX}:"
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self.remember_script = client.register_script(_REMEMBER)
        self.delivered_script = client.register_script(_DELIVERED)
        self.withdraw_script = client.register_script(_WITHDRAW)
        self._release = client.register_script(_RELEASE)
        self.locks = KeyLocks()
        # The Redis keys this store's claims hold now, with their fences; one task renews them all.
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """Whether Redis answered the last command."""
        return self._link.available

    def readable(self, value: bytes | None) -> Remembered | None:
        """The answer in ``value``; None for none, and for one no key of this worker opens (``_take`` gives it back)."""
        if not value:
            return None
        try:
            return unpack(memoryview(value), self.cipher())
        except AnswerUnreadableError:
            return None

    def redis_key(self, key: IdempotencyKey) -> str:
        """Where ``key`` lives in Redis: a digest, so a caller's ids cannot shape Redis keys."""
        publisher, message_id = key
        digest = hashlib.sha256(f"{publisher}\0{message_id}".encode("utf-8", "surrogatepass")).hexdigest()
        return self._prefix + digest

    @asynccontextmanager
    async def claim(self, key: IdempotencyKey | None, deadline: float | None = None) -> AsyncIterator[Claim]:
        """Hold ``key`` for one request, here and in Redis, until the block ends."""
        if key is None or not self._enabled:
            yield NoClaim()
            return
        async with self.locks.hold(key):
            redis_key = self.redis_key(key)
            claim = _RedisClaim(self, [redis_key, redis_key + ":spent"], uuid.uuid4().hex)
            await self._take(claim, deadline)
            if claim.found is Found.ANSWERED or claim.found is Found.SPENT:
                yield claim
                return
            self._held[redis_key] = claim.fence
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew_leases())
            try:
                yield claim
            finally:
                if claim.held:
                    self.let_go(redis_key)
                    with contextlib.suppress(*REDIS_FAILURES):  # the lease ends by itself
                        await self.run(self._release, [redis_key], [claim.fence, self.window_ms])

    async def _take(self, claim: _RedisClaim, deadline: float | None) -> None:
        """Lease the key for ``claim``, or find its answer; wait while another holds it."""
        poll = POLL_FIRST_SECONDS
        while True:
            try:
                status, value = await self.run(self._claim, claim.keys, [claim.fence, self.lease_ms])
            except REDIS_FAILURES:
                wait = REDIS_RETRY_SECONDS
            else:
                if status != 2:
                    claim.found = {0: Found.ANSWERED, 1: Found.NEW, 3: Found.UNSETTLED, 4: Found.SPENT}[status]
                    if value:
                        claim.remembered = await self._opened(claim, value)
                        claim.tag = _tag(claim.remembered.reply)
                    return
                wait = min(poll, max(0.001, int(value) / 1000))
                poll = min(POLL_LAST_SECONDS, poll * 2)
            if deadline is not None and time.time() + wait >= deadline:
                msg = "x-deadline passed while another request with this message_id was being answered"
                raise DeadlineExceededError(msg)
            await asyncio.sleep(wait)

    async def _opened(self, claim: _RedisClaim, value: bytes) -> Remembered:
        """The answer ``_take`` found; AnswerUnreadableError when no key of this worker opens it.

        The caller gives the request back for a replica that can; an unsettled answer this claim has
        just leased is let go first, so that replica need not wait out the lease.
        """
        try:
            return unpack(memoryview(value), self.cipher())
        except AnswerUnreadableError as exc:
            if claim.found is Found.UNSETTLED:
                exc.unsettled = True
                with contextlib.suppress(*REDIS_FAILURES):
                    await self.run(self._release, claim.keys[:1], [claim.fence, self.window_ms])
            raise

    async def run(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> tuple[int, bytes]:  # noqa: ANN401
        """Run one of the store's scripts; its status and value, checked to be its own answer."""
        status, value, fence = await self._link.script(script, keys, args)
        if fence != str(args[0]).encode():
            error = RedisMixupError("Redis answered with another command's fence")
            await self._link.drop(error)
            raise error
        return int(status), bytes(value)

    async def run_until_answered(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> tuple[int, bytes]:  # noqa: ANN401
        """``run``, retried while Redis is away: the request waits (the worker pauses meanwhile) rather than guess."""
        while True:
            try:
                return await self.run(script, keys, args)
            except REDIS_FAILURES:
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    def let_go(self, redis_key: str) -> None:
        """Stop renewing ``redis_key``'s lease."""
        self._held.pop(redis_key, None)

    async def _renew_leases(self) -> None:
        """Keep this store's leases alive while it holds any."""
        while self._held:
            await asyncio.sleep(self._lease_seconds / 4)
            held = dict(self._held)
            if not held:
                return
            with contextlib.suppress(*REDIS_FAILURES):  # the link has said so; the next round tries again
                await self._link.script(self._renew, list(held), [self.lease_ms, *held.values()])

    async def close(self) -> None:
        """Stop renewing and close the client (leases not let go end by themselves)."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        await self._link.close()
