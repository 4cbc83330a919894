"""One Redis client, and whether Redis answered its last command.

The rate limiter's window and the idempotency store each hold one link.
Their commands go out in pipelines, one at a time a link: a command asked
for while no pipeline is out goes at the end of the event loop's pass, with
whatever else that pass asked for; commands asked for while one is out wait
for it and go together as the next. One request alone is never delayed; a
drain's many requests share round trips (as Nagle's algorithm does for TCP
segments).

While Redis cannot be reached, their callers wait rather than guess (no
slot is given, no claim is made), the link says so once in the log, and
the worker pauses consumption and reports not-ready until every link
answers again (it asks with ``check``).

A command is sent once: redis-py's own retries are off (a command that
timed out may still run when Redis wakes up, and a second copy of it would
run after it). After any failure, timeout or cancellation the link drops
its connections rather than reuse them: a reply still on the way would
otherwise be read as the answer to the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import redis
import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from sign_in_tokens_client.contract.errors import ConfigError, untrusted_certificate

REDIS_TIMEOUT_SECONDS: Final = 2.0
# While Redis is unreachable, how often a waiting caller asks again.
REDIS_RETRY_SECONDS: Final = 0.5
# What a command to Redis raises when Redis is away (timeouts included).
REDIS_FAILURES: Final = (redis.RedisError, OSError)

log = structlog.get_logger(__name__)


class _Queued(NamedTuple):
    command: tuple[Any, ...]
    script: AsyncScript | None
    keys: Sequence[str]
    args: Sequence[Any]
    answer: asyncio.Future[Any]


class RedisLink:
    """A client for the Redis at ``url``, used for ``purpose`` (named in the log)."""

    def __init__(self, url: str, purpose: str) -> None:
        """Make the client; it connects at its first command."""
        self.client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        self.purpose = purpose
        self.available = True
        self.answered_at = time.monotonic()
        self._batch: list[_Queued] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False

    async def script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """Run a registered script, in the next pipeline (see ``command``)."""
        return await self._queue(("EVALSHA", script.sha, len(keys), *keys, *args), script, keys, args)

    async def command(self, *command: Any) -> Any:  # noqa: ANN401
        """Run one command, in the next pipeline (with every other command asked for until it goes)."""
        return await self._queue(command, None, (), ())

    async def _queue(
        self, command: tuple[Any, ...], script: AsyncScript | None, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:  # noqa: ANN401
        if self._closed:
            msg = f"the link to Redis ({self.purpose}) is closed"
            raise redis.ConnectionError(msg)
        loop = asyncio.get_running_loop()
        if not self._batch and not self._sending:
            loop.call_soon(self._send_batch)
        answer: asyncio.Future[Any] = loop.create_future()
        self._batch.append(_Queued(command, script, keys, args, answer))
        return await answer

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.ensure_future(self._pipeline(batch))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        """A pipeline came back: what was asked for meanwhile goes now."""
        self._sending.discard(task)
        if self._closed:
            for queued in self._batch:
                queued.answer.cancel()
            self._batch.clear()
        elif self._batch and not self._sending:
            self._send_batch()

    async def _pipeline(self, batch: list[_Queued]) -> None:
        """Send ``batch`` as one pipeline; each caller gets its answer, or the error that stopped it."""
        pipe = self.client.pipeline(transaction=False)
        for queued in batch:
            pipe.execute_command(*queued.command)
        try:
            answers = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            await asyncio.shield(self.drop())
            for queued in batch:
                queued.answer.cancel()
            raise
        except REDIS_FAILURES as exc:
            await self.drop(exc)
            answers = [exc] * len(batch)
        refused: BaseException | None = None
        for queued, answer in zip(batch, answers, strict=True):
            result = await self._reloaded(queued, answer)
            if isinstance(result, REDIS_FAILURES):
                refused = result
            if queued.answer.done():
                continue
            if isinstance(result, BaseException):
                queued.answer.set_exception(result)
            else:
                queued.answer.set_result(result)
        # Redis is available when it took every command (a refused one, an ACL say, is said once).
        if refused is None:
            self.answered()
        else:
            self.failed(refused)

    async def _reloaded(self, queued: _Queued, answer: Any) -> Any:  # noqa: ANN401
        """``answer``, or, for a script Redis forgot (it restarted), the answer of the script loaded again."""
        if not (isinstance(answer, NoScriptError) and queued.script is not None):
            return answer
        try:
            return await queued.script(keys=queued.keys, args=queued.args)
        except REDIS_FAILURES as exc:
            await self.drop(exc)
            return exc

    async def drop(self, exc: BaseException | None = None) -> None:
        """Close every connection (the next command opens a new one); ``exc``: why, as ``failed`` records it."""
        if exc is not None:
            self.failed(exc)
        with contextlib.suppress(*REDIS_FAILURES):
            await self.client.connection_pool.disconnect()

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
        self.answered_at = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since Redis last answered this link (an idle worker asks it now and then: ``check``)."""
        return time.monotonic() - self.answered_at

    def _raise_if_untrusted(self, exc: BaseException) -> None:
        """ConfigError when ``exc`` is a TLS certificate that did not verify."""
        reason = untrusted_certificate(exc)
        if reason is not None:
            msg = f"REDIS_URL: the certificate of Redis ({self.purpose}) did not verify ({reason}); check ssl_ca_certs"
            raise ConfigError(msg)

    async def check(self, *, at_start: bool = False) -> bool:
        """Ask Redis (PING) whether it answers; returns and records the answer.

        ``at_start``: a certificate that does not verify is ConfigError (fail closed, at once:
        waiting will not make it trusted). Later it is one more reason Redis is unavailable.
        """
        try:
            await self.client.ping()
        except asyncio.CancelledError:
            await asyncio.shield(self.drop())
            raise
        except REDIS_FAILURES as exc:
            if at_start:
                self._raise_if_untrusted(exc)
            await self.drop(exc)
        else:
            self.answered()
        return self.available

    async def close(self) -> None:
        """Close the client's connections (a pipeline still out is cancelled: its callers get CancelledError)."""
        self._closed = True
        for task in self._sending:
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self.client.aclose()
