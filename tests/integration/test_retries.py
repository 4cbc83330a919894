"""Transient failures: retried with backoff, Retry-After honoured, others not held up."""

from __future__ import annotations

import time

from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created, Failed

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import WorkerFactory


async def test_503_then_success_is_created_on_the_second_attempt(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """One 503, then Clerk works: the reply is `created`, after two upstream calls."""
    fake_clerk.fail_next(503)
    reply = await client.request("user_a")
    assert isinstance(reply, Created)
    assert fake_clerk.stats.create_calls == 2
    assert worker.metrics.retries.labels("interactive")._value.get() == 1


async def test_429_retry_after_is_honoured(worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk) -> None:
    """A 429 with `Retry-After: 1` is retried no sooner than one second later."""
    fake_clerk.fail_next(429, retry_after=1)
    started = time.monotonic()
    reply = await client.request("user_a")
    assert isinstance(reply, Created)
    assert time.monotonic() - started >= 1.0
    assert fake_clerk.stats.create_calls == 2


async def test_a_request_waiting_to_retry_does_not_hold_up_others(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """While one request waits out a 2 s Retry-After, a later request is answered first."""
    await start_worker(upstream_concurrency=1, retry_max_delay_seconds=5)
    fake_clerk.fail_next(503, retry_after=2)
    slow = await client.send(b'{"user_id": "user_slow"}')
    fast = await client.send(b'{"user_id": "user_fast"}')
    fast_reply = await fast
    assert not slow.done()
    slow_reply = await slow
    assert fast_reply.received_at < slow_reply.received_at
    assert isinstance(slow_reply.decode(), Created)


async def test_retry_after_longer_than_the_longest_wait_is_answered_at_once(
    worker: Worker,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """A Retry-After beyond RETRY_MAX_DELAY_SECONDS is not waited for: `rate_limited` now, retryable."""
    fake_clerk.fail_next(429, retry_after=60)
    started = time.monotonic()
    reply = await client.request("user_a")
    assert isinstance(reply, Failed)
    assert (reply.error.code, reply.error.retryable, reply.error.attempts) == ("rate_limited", True, 1)
    assert time.monotonic() - started < 5
