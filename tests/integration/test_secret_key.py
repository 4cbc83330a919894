"""A 401 from Clerk: no reply, consumption paused, a probe, resumption by itself."""

from __future__ import annotations

from service.client import TokenClient
from service.fake_clerk import FakeClerk
from service.messages import Created
from service.worker import Worker
from tests.conftest import SECRET_KEY, wait_until
from tests.workers import readyz


async def test_bad_key_pauses_without_replies_and_resumes_when_it_works(
    worker: Worker,
    client: TokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """Requests sent while the key is rejected wait, unanswered; all are answered once it works."""
    assert await readyz(worker.health.port) == 200
    fake_clerk.accepted_keys = {"sk_test_other"}
    futures = [await client.send(b'{"user_id": "user_k%d"}' % i) for i in range(5)]
    await wait_until(lambda: not worker.key_ok, what="the worker to notice the bad key")
    assert await readyz(worker.health.port) == 503
    await wait_until(lambda: not worker.readiness()["consuming"], what="consumption to pause")
    probes_before = fake_clerk.stats.create_calls
    await wait_until(lambda: fake_clerk.stats.create_calls > probes_before, what="a probe")
    assert not any(f.done() for f in futures)
    fake_clerk.accepted_keys = {SECRET_KEY}
    replies = [(await f).decode() for f in futures]
    assert all(isinstance(r, Created) for r in replies)
    await wait_until(lambda: all(worker.readiness().values()), what="ready")
    assert await readyz(worker.health.port) == 200
