"""Deadlines shorter than Clerk's latency, and a 200 that is not a token: no live token left behind."""

from __future__ import annotations

import time

from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Failed

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import WorkerFactory, wait_until


async def test_a_deadline_shorter_than_clerks_latency_leaves_no_live_token_and_no_outage(
    start_worker: WorkerFactory, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """Clerk answers in 1.2 s, deadlines are 600 ms: every token made is revoked, and Clerk is not marked down."""
    worker = await start_worker(outage_failure_threshold=3)
    fake_clerk.latency_seconds = 1.2
    deadline_ms = int(time.time() * 1000) + 600
    futures = [await client.send(b'{"user_id": "user_t%d"}' % i, deadline_ms=deadline_ms) for i in range(12)]
    replies = [(await f).decode() for f in futures]
    assert {r.error.code for r in replies if isinstance(r, Failed)} == {"deadline_exceeded"}
    assert len(replies) == 12
    await wait_until(lambda: len(fake_clerk.stats.revoked) == fake_clerk.stats.created, what="every late token revoked")
    assert fake_clerk.stats.created > 0
    assert not worker.parts.upstream(None).breaker.is_open
    assert worker.readiness()["upstream_available"]


async def test_a_200_that_is_not_a_token_is_not_retried_and_its_token_is_revoked(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """One upstream call, the token it made revoked, `upstream_unavailable` not retryable, the breaker untouched."""
    fake_clerk.malformed_next = 1
    reply = await client.request("user_malformed")
    assert isinstance(reply, Failed)
    assert (reply.error.code, reply.error.retryable, reply.error.attempts) == ("upstream_unavailable", False, 1)
    assert reply.error.upstream_status == 200
    assert fake_clerk.stats.create_calls == 1
    await wait_until(lambda: fake_clerk.stats.revoked == set(fake_clerk.stats.tokens), what="the revoke")
    assert fake_clerk.stats.created == 1
    assert worker.parts.upstream(None).breaker._failures == 0
