"""Clerk unavailable: the worker stops taking requests, holds those it has, and resumes by itself."""

from __future__ import annotations

import time

from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created, Failed

from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, wait_until


async def test_outage_pauses_consumption_and_requests_are_created_after_recovery(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """Three unavailable answers open the breaker; nothing fails meanwhile; all are created once Clerk is back."""
    worker = await start_worker(outage_failure_threshold=3, probe_max_interval_seconds=0.5, max_attempts=5)
    fake_clerk.fail_next(503, count=1000)
    futures = [await client.send(b'{"user_id": "user_o%d"}' % i) for i in range(20)]
    await wait_until(lambda: worker.parts.upstream(None).breaker.is_open, what="the breaker to open")
    await wait_until(lambda: not worker.readiness()["consuming"], what="consumption to pause")
    probes = fake_clerk.stats.create_calls
    await wait_until(lambda: fake_clerk.stats.create_calls >= probes + 2, what="two probes")
    assert not any(f.done() for f in futures)
    fake_clerk.faults.clear()
    replies = [(await f).decode() for f in futures]
    assert all(isinstance(r, Created) for r in replies)
    await wait_until(lambda: all(worker.readiness().values()), what="ready again")
    assert fake_clerk.stats.created == 20


async def test_a_deadline_is_kept_while_clerk_is_unavailable(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """A request waiting out an outage gets `deadline_exceeded` at its deadline, not later."""
    await start_worker(outage_failure_threshold=1, probe_max_interval_seconds=0.5)
    fake_clerk.fail_next(503, count=1000)
    started = time.monotonic()
    received = await (await client.send(b'{"user_id": "user_d"}', deadline_ms=int(time.time() * 1000) + 1500))
    reply = received.decode()
    assert isinstance(reply, Failed)
    assert reply.error.code == "deadline_exceeded"
    assert time.monotonic() - started < 3


async def test_held_requests_fail_after_outage_hold_seconds(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """OUTAGE_HOLD_SECONDS bounds a request over all its attempts: `upstream_unavailable`, retryable, after about 1 s (not 5 x 1 s)."""
    await start_worker(outage_failure_threshold=1, outage_hold_seconds=1, probe_max_interval_seconds=0.5)
    fake_clerk.fail_next(503, count=1000)
    started = time.monotonic()
    reply = await client.request("user_held")
    assert isinstance(reply, Failed)
    assert (reply.error.code, reply.error.retryable) == ("upstream_unavailable", True)
    assert "longer than 1 s" in reply.error.message
    assert time.monotonic() - started < 3
