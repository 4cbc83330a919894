"""Who received which token, so that only that caller can have it revoked through the queue.

Before a ``created`` reply is sent, the worker records the token's id
with a digest of the caller (the request's validated ``user_id``) for as
long as the token can live (its ``expires_in_seconds``, Clerk's 30 days
when absent). A revocation request is served only for the caller recorded.
With ``REDIS_URL`` the record is in Redis (every replica sees it; keys and
values are digests, so a listing shows no token id or caller), else in this
process: the last ``MAX_ENTRIES`` tokens (the oldest go first: such a token
can then no longer be revoked through the queue, only at Clerk), each entry
two integers (about 170 bytes: 8.5 MiB in all), not the strings.
"""

from __future__ import annotations

import hashlib
from typing import Final

from sign_in_tokens_client.connection import DEFAULT_INSTANCE
from sign_in_tokens_client.contract.messages import Kind

from service.state.dedup.memory import ExpiringIds, digest64
from service.state.redis_link import RedisLink

# Clerk's lifetime of a token asked for without ``expires_in_seconds``.
CLERK_DEFAULT_LIFETIME_SECONDS: Final = 2_592_000
MAX_ENTRIES: Final = 50_000
REDIS_KEY_PREFIX: Final = "sign_in_tokens:grant"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _named(kind: Kind, token_id: str, state: str | None) -> str:
    """What a grant is recorded under: a sign-in token's id (as before), an actor token's with its kind.

    So an actor token's id sent as a sign-in token's (or the other way round) names no grant; and
    a token of another Clerk instance than ``default`` is named with its instance's state id (ids
    are Clerk's: letters, digits, ``_`` and ``-``, so no name collides with another).
    """
    named = token_id if kind == "sign_in_token" else f"{kind}:{token_id}"
    return named if state in (None, DEFAULT_INSTANCE) else f"{state}/{named}"


class Grants:
    """The record of which caller received each token."""

    def __init__(
        self, redis: RedisLink | None, legacy_key_id: str | None = None, max_entries: int = MAX_ENTRIES
    ) -> None:
        """In Redis through ``redis``, else in this process.

        ``legacy_key_id``: the digest of the ``default`` instance's key, under which earlier versions
        kept its grants in Redis; read too while those grants may live (a rolling upgrade).
        """
        self._redis = redis
        self._prefix = f"{REDIS_KEY_PREFIX}:"
        self._legacy = None if legacy_key_id is None else f"{REDIS_KEY_PREFIX}:{legacy_key_id}:"
        # Each token's entry holds the index of its caller in the callers seen.
        self._memory = ExpiringIds(max_entries)
        # The callers seen (a handful): an entry holds an index, not a string.
        self._callers: dict[str, int] = {}

    async def record(
        self,
        kind: Kind,
        token_id: str,
        caller: str | None,
        expires_in_seconds: int | None,
        *,
        state: str | None = None,
    ) -> None:
        """Remember that ``caller`` received ``token_id`` of ``state``'s instance; REDIS_FAILURES if Redis fails."""
        token_id = _named(kind, token_id, state)
        lifetime = expires_in_seconds or CLERK_DEFAULT_LIFETIME_SECONDS
        if self._redis is not None:
            await self._redis.command("SET", self._prefix + _digest(token_id), _digest(caller or ""), "EX", lifetime)
            return
        holder = self._callers.setdefault(caller or "", len(self._callers))
        self._memory.add(digest64(token_id), lifetime, holder)

    async def received_by(self, kind: Kind, token_id: str, caller: str | None, *, state: str | None = None) -> bool:
        """Whether ``caller`` is recorded as having received ``token_id`` of ``state``'s instance (and it lives)."""
        token_id = _named(kind, token_id, state)
        if self._redis is not None:
            found = await self._redis.command("GET", self._prefix + _digest(token_id))
            if found is None and self._legacy is not None and state in (None, DEFAULT_INSTANCE):
                found = await self._redis.command("GET", self._legacy + _digest(token_id))
            return found is not None and found.decode() == _digest(caller or "")
        recorded = self._memory.get(digest64(token_id))
        return recorded is not None and recorded == self._callers.get(caller or "")
