"""The idempotency store in Redis, shared by every replica that calls Clerk with the same key.

One Redis key per request key holds either a lease or an answer:

- a claim sets a lease (``L`` and this store's owner id) if the key is
  free, atomically, and returns an answer that is already there; a key
  leased by another replica is polled until its answer comes or its lease
  runs out;
- while a claim is held, one task renews every lease this store holds, so a
  long retry keeps its key; a replica that dies stops renewing, and its
  lease expires within ``LEASE_SECONDS``: a redelivery on another replica
  then calls Clerk (the first replica had not answered, so no caller holds
  a token from it);
- the answer (``A`` and the packed request and reply) replaces
  the lease before the reply is published and expires with the window.

Redis keys are a digest of the publisher and ``message_id`` under a prefix
naming the Clerk key, so two deployments with different keys never share
answers. The store holds tokens: docs/security.md says how to protect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import structlog

from service.dedup import IdempotencyKey, KeyLocks, Remembered, pack, unpack
from service.errors import DeadlineExceededError
from service.messages import Reply
from service.redis_link import REDIS_FAILURES, REDIS_RETRY_SECONDS, RedisLink

# A claim's lease, renewed every quarter of it while its request is handled.
LEASE_SECONDS: Final = 5.0
# Polling a key another replica holds: from the first interval, doubling, to the last.
POLL_FIRST_SECONDS: Final = 0.01
POLL_LAST_SECONDS: Final = 0.2
# How long an answer is retried while Redis is away before the reply goes out without it.
REMEMBER_PATIENCE_SECONDS: Final = 5.0
REDIS_KEY_PREFIX: Final = "sign_in_tokens:idempotency"

log = structlog.get_logger(__name__)

_LEASE: Final = b"L"
_ANSWER: Final = b"A"

# KEYS[1]: the key. ARGV: our lease, the lease in ms.
# Returns {1, ''} claimed, {0, answer} answered, {2, pttl} leased by another.
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if (not value) or value == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return {1, ''}
end
if string.sub(value, 1, 1) == 'A' then
    return {0, value}
end
return {2, tostring(redis.call('PTTL', KEYS[1]))}
"""

# KEYS: the keys we lease. ARGV: our lease, the lease in ms.
_RENEW = """
for _, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then
        redis.call('PEXPIRE', key, ARGV[2])
    end
end
return 0
"""

# KEYS[1]: the key. ARGV[1]: our lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotencyStore:
    """Final replies by key in Redis, for ``window_seconds``, shared by every user of ``key_id``."""

    def __init__(self, url: str, window_seconds: float, key_id: str, lease_seconds: float = LEASE_SECONDS) -> None:
        """A store in the Redis at ``url``; a window of 0 remembers nothing."""
        self._link = RedisLink(url, "idempotency_store")
        self.redis: RedisLink | None = self._link
        client = self._link.client
        self._enabled = window_seconds > 0
        self._window_ms = max(1, int(window_seconds * 1000))
        self._lease_seconds = lease_seconds
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self._lease = _LEASE + uuid.uuid4().hex.encode()
        self._prefix = f"{REDIS_KEY_PREFIX}:{key_id}:"
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.locks = KeyLocks()
        # The Redis keys this store leases now; one task renews them all.
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """Whether Redis answered the last command."""
        return self._link.available

    def redis_key(self, key: IdempotencyKey) -> str:
        """Where ``key`` lives in Redis: a digest, so a caller's ids cannot shape Redis keys."""
        publisher, message_id = key
        digest = hashlib.sha256(f"{publisher}\0{message_id}".encode("utf-8", "surrogatepass")).hexdigest()
        return self._prefix + digest

    @asynccontextmanager
    async def claim(
        self, key: IdempotencyKey | None, deadline: float | None = None
    ) -> AsyncIterator[Remembered | None]:
        """Hold ``key`` for one request, here and in Redis; yields the remembered answer, if any."""
        if key is None or not self._enabled:
            yield None
            return
        async with self.locks.hold(key):
            redis_key = self.redis_key(key)
            remembered = await self._take(redis_key, deadline)
            if remembered is not None:
                yield remembered
                return
            self._held.add(redis_key)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew_leases())
            try:
                yield None
            finally:
                if redis_key in self._held:  # not answered: let the next claim call Clerk
                    self._held.discard(redis_key)
                    with contextlib.suppress(*REDIS_FAILURES):
                        await self._link.script(self._release, [redis_key], [self._lease])

    async def _take(self, redis_key: str, deadline: float | None) -> Remembered | None:
        """Lease ``redis_key`` and return None, or return the answer there; wait while another holds it."""
        poll = POLL_FIRST_SECONDS
        while True:
            try:
                status, value = await self._link.script(self._claim, [redis_key], [self._lease, self._lease_ms])
            except REDIS_FAILURES as exc:
                self._link.failed(exc)
                wait = REDIS_RETRY_SECONDS
            else:
                self._link.answered()
                if status == 1:
                    return None
                if status == 0:
                    return unpack(memoryview(value)[1:])
                wait = min(poll, max(0.001, int(value) / 1000))
                poll = min(POLL_LAST_SECONDS, poll * 2)
            if deadline is not None and time.time() + wait >= deadline:
                msg = "x-deadline passed while another request with this message_id was being answered"
                raise DeadlineExceededError(msg)
            await asyncio.sleep(wait)

    async def _renew_leases(self) -> None:
        """Keep this store's leases alive while it holds any."""
        while self._held:
            await asyncio.sleep(self._lease_seconds / 4)
            if not self._held:
                return
            try:
                await self._renew(keys=sorted(self._held), args=[self._lease, self._lease_ms])
            except REDIS_FAILURES as exc:
                self._link.failed(exc)
            else:
                self._link.answered()

    async def remember(self, key: IdempotencyKey | None, request: bytes, reply: Reply) -> None:
        """Put the answer in place of the lease, for the window; wait a little while Redis is away."""
        if key is None or not self._enabled:
            return
        redis_key = self.redis_key(key)
        value = _ANSWER + pack(request, reply)
        give_up = time.monotonic() + REMEMBER_PATIENCE_SECONDS
        while True:
            try:
                await self._link.command("SET", redis_key, value, "PX", self._window_ms)
            except REDIS_FAILURES as exc:
                self._link.failed(exc)
                if time.monotonic() >= give_up:
                    # The reply goes out anyway: holding a created token back helps nobody.
                    log.error(  # noqa: TRY400 - an outage, not a defect: no traceback
                        "idempotency_answer_not_stored", reason="redis_unavailable"
                    )
                    break
                await asyncio.sleep(REDIS_RETRY_SECONDS)
            else:
                self._link.answered()
                break
        self._held.discard(redis_key)

    async def forget(self, key: IdempotencyKey | None) -> None:
        """Drop a remembered reply (its token was revoked)."""
        if key is None or not self._enabled:
            return
        with contextlib.suppress(*REDIS_FAILURES):
            await self._link.client.delete(self.redis_key(key))

    async def close(self) -> None:
        """Stop renewing and close the client (leases not answered expire by themselves)."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        await self._link.close()
