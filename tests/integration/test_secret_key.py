"""A 401 from Clerk: no reply, consumption paused, a probe, resumption by itself."""

from __future__ import annotations

import time

from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created, Failed

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import SECRET_KEY, WorkerFactory, wait_until
from tests.workers import readyz


async def test_bad_key_pauses_without_replies_and_resumes_when_it_works(
    worker: Worker,
    client: SignInTokenClient,
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


async def test_readiness_follows_clerks_last_word_on_the_key(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """The held probe answered without a call to Clerk (its deadline passed) does not make the bad key good."""
    worker = await start_worker(probe_max_interval_seconds=0.3)
    fake_clerk.accepted_keys = {"sk_test_other"}
    future = await client.send(b'{"user_id": "user_p"}', deadline_ms=int(time.time() * 1000) + 1500)
    reply = (await future).decode()
    assert isinstance(reply, Failed)
    assert reply.error.code == "deadline_exceeded"
    calls = fake_clerk.stats.create_calls
    await wait_until(lambda: fake_clerk.stats.create_calls > calls + 1, what="probes that create no token")
    assert not worker.key_ok
    assert not worker.readiness()["consuming"]
    assert await readyz(worker.health.port) == 503
    fake_clerk.accepted_keys = {SECRET_KEY}
    await wait_until(lambda: all(worker.readiness().values()), what="ready once Clerk accepts the key")
    assert isinstance(await client.request("user_after"), Created)
    assert fake_clerk.stats.created == 1


async def test_a_probe_whose_hold_ran_out_goes_on_probing_and_the_worker_turns_ready(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """KEY_PROBE_HOLD_SECONDS passes: the request goes back, probing goes on without it, and all resumes when the key works."""
    worker = await start_worker(probe_max_interval_seconds=0.3, key_probe_hold_seconds=1)
    fake_clerk.accepted_keys = {"sk_test_other"}
    future = await client.send(b'{"user_id": "user_held"}')
    await wait_until(lambda: not worker.key_ok, what="the bad key")
    started = time.monotonic()
    await wait_until(lambda: time.monotonic() - started > 1.5 and fake_clerk.stats.create_calls >= 5, what="probes")
    assert not worker.readiness()["consuming"]
    assert not future.done()
    fake_clerk.accepted_keys = {SECRET_KEY}
    assert isinstance((await future).decode(), Created)
    await wait_until(lambda: all(worker.readiness().values()), what="ready")
