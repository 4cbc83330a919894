"""Several Clerk instances behind one worker: each its own key, limit and breaker; a held one holds only its own.

Against a real broker and the stand-in Clerk, which takes each instance's key (and limits each on
its own). The token ledger balances after each test.
"""

from __future__ import annotations

import time
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests import ledger
from tests.conftest import WorkerFactory, queue_depth, wait_depth, wait_until
from tests.instances import PROD, PROD_KEY, STAGING_KEY, limited, replies_to
from tests.instances import instances_file as write_instances
from tests.workers import publish_requests


def instances_file(tmp_path: Path, fake_clerk: FakeClerk, prod_limit: int = 1000, staging_limit: int = 1000) -> str:
    """Two instances, prod and staging, each with its key and limit (a 1 s window), at the stand-in Clerk."""
    fake_clerk.accepted_keys |= {PROD_KEY, STAGING_KEY}
    path = tmp_path / "instances.toml"
    return write_instances(path, fake_clerk, prod=limited(prod_limit), staging=limited(staging_limit))


async def instance_checks(worker: Worker) -> dict[str, object]:
    """/readyz's answer: its status and body."""
    url = f"http://127.0.0.1:{worker.health.port}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return {"status": response.status, **await response.json()}


async def test_each_instance_gets_its_own_key_and_is_held_to_its_own_limit(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """Prod at 20 calls a second, staging at 5: both drained at once, each at its own limit, no 429."""
    fake_clerk.rate_window_seconds = 1.0
    fake_clerk.rate_limits = {PROD_KEY: 20, STAGING_KEY: 5}
    path = instances_file(tmp_path, fake_clerk, prod_limit=20, staging_limit=5)
    await start_worker(clerk_instances_file=path, clerk_rate_window_seconds=1)
    prod, staging = [await replies_to(channel, queue_names, name) for name in ("prod", "staging")]
    bulk = queue_names["BULK_QUEUE"]
    started = time.monotonic()
    await publish_requests(channel, bulk, prod.queue, 60, prefix="p", headers={"x-clerk-instance": "prod"})
    await publish_requests(channel, bulk, staging.queue, 15, prefix="s", headers={"x-clerk-instance": "staging"})
    await wait_until(lambda: prod.answered == 60 and staging.answered == 15, timeout=20, what="both drained")
    took = time.monotonic() - started
    assert prod.outcomes == {"created": 60}
    assert staging.outcomes == {"created": 15}
    assert fake_clerk.stats.rate_limited == 0
    assert fake_clerk.stats.busiest_window(PROD_KEY, 1.0) <= 20
    assert fake_clerk.stats.busiest_window(STAGING_KEY, 1.0) <= 5
    assert took >= 2.0  # both limits bite: 60 at 20/s and 15 at 5/s take at least 2 s each, side by side
    assert took < 8.0  # ... side by side, not one after the other
    await _balanced()


async def test_a_rejected_key_holds_only_its_instance_and_its_requests_are_answered_once_it_works(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """Staging's key refused (401): its requests wait in its hold queue, prod's are served, /readyz says which."""
    path = instances_file(tmp_path, fake_clerk)
    fake_clerk.accepted_keys.discard(STAGING_KEY)
    worker = await start_worker(clerk_instances_file=path)
    prod, staging = [await replies_to(channel, queue_names, name) for name in ("prod", "staging")]
    interactive = queue_names["REQUEST_QUEUE"]
    await publish_requests(channel, interactive, staging.queue, 10, prefix="s", headers={"x-clerk-instance": "staging"})
    hold = f"{queue_names['HOLD_QUEUE_PREFIX']}.staging"
    await wait_until(lambda: not worker.parts.upstreams["staging"].key_ok, what="staging's key rejected")
    await publish_requests(channel, interactive, prod.queue, 30, prefix="p", headers={"x-clerk-instance": "prod"})
    await wait_until(lambda: prod.answered == 30, what="prod served while staging is held")
    assert prod.outcomes == {"created": 30}
    assert staging.answered == 0
    await wait_depth(channel, hold, 10)
    checks = await instance_checks(worker)
    assert checks["status"] == 200  # ready: prod works
    assert checks["instances"] == {
        "prod": {"key_ok": True, "upstream_available": True},
        "staging": {"key_ok": False, "upstream_available": True},
    }
    fake_clerk.accepted_keys.add(STAGING_KEY)
    await wait_until(lambda: staging.answered == 10, timeout=15, what="staging answered once its key works")
    assert staging.outcomes == {"created": 10}
    assert staging.duplicates == 0
    assert await queue_depth(channel, hold) == 0
    await _balanced()


async def test_an_outage_of_one_instance_holds_only_it(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """Clerk answers 503 to staging only: its breaker opens, its requests wait; prod is served; both end answered."""
    path = instances_file(tmp_path, fake_clerk)
    fake_clerk.down_keys.add(STAGING_KEY)
    worker = await start_worker(clerk_instances_file=path, outage_failure_threshold=2)
    prod, staging = [await replies_to(channel, queue_names, name) for name in ("prod", "staging")]
    bulk = queue_names["BULK_QUEUE"]
    await publish_requests(channel, bulk, staging.queue, 20, prefix="s", headers={"x-clerk-instance": "staging"})
    await wait_until(lambda: worker.parts.upstreams["staging"].breaker.is_open, what="staging's breaker to open")
    await publish_requests(channel, bulk, prod.queue, 30, prefix="p", headers={"x-clerk-instance": "prod"})
    await wait_until(lambda: prod.answered == 30, what="prod served during staging's outage")
    assert prod.outcomes == {"created": 30}
    assert staging.answered == 0
    assert (await instance_checks(worker))["status"] == 200
    fake_clerk.down_keys.clear()
    await wait_until(lambda: staging.answered == 20, timeout=15, what="staging answered after its outage")
    assert staging.outcomes == {"created": 20}
    await _balanced()


async def test_one_instances_bulk_backlog_does_not_delay_anothers_bulk_requests(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """200 bulk requests for prod at 10 a second, then 10 for staging: staging's are answered in about a second.

    Without the hold queue, staging's would wait behind prod's in the bulk lane's prefetch (20 s).
    """
    path = instances_file(tmp_path, fake_clerk, prod_limit=10)
    await start_worker(clerk_instances_file=path, prefetch=40)
    prod, staging = [await replies_to(channel, queue_names, name) for name in ("prod", "staging")]
    bulk = queue_names["BULK_QUEUE"]
    await publish_requests(channel, bulk, prod.queue, 200, prefix="p", headers={"x-clerk-instance": "prod"})
    await wait_until(lambda: prod.answered >= 5, what="prod's backlog to start draining")
    started = time.monotonic()
    await publish_requests(channel, bulk, staging.queue, 10, prefix="s", headers={"x-clerk-instance": "staging"})
    await wait_until(lambda: staging.answered == 10, timeout=10, what="staging's bulk requests")
    staging_took = time.monotonic() - started
    assert staging.outcomes == {"created": 10}
    assert prod.answered < 100  # prod's backlog was still draining
    assert staging_took < 3.0
    await wait_until(lambda: prod.answered == 200, timeout=40, what="prod's backlog")
    assert prod.outcomes == {"created": 200}
    assert fake_clerk.stats.busiest_window(PROD_KEY, 1.0) <= 10
    await _balanced()


async def test_only_the_workers_own_messages_are_taken_from_a_hold_queue(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
    caller_urls: dict[str, str],
) -> None:
    """A caller that writes to a hold queue, naming another caller in x-caller, gets nothing made; nor a reply there."""
    path = instances_file(tmp_path, fake_clerk)
    await start_worker(clerk_instances_file=path, service_user="guest")
    replies = await replies_to(channel, queue_names, "forged")
    hold = f"{queue_names['HOLD_QUEUE_PREFIX']}.prod"
    async with await aio_pika.connect(caller_urls["outsider"]) as mallory:
        forger = await mallory.channel()
        forged = aio_pika.Message(
            b'{"user_id": "user_victim"}',
            reply_to=replies.queue,
            message_id="forged-1",
            user_id="outsider",
            headers={"x-caller": "portal", "x-source": "interactive", "x-clerk-instance": "prod"},
        )
        await forger.default_exchange.publish(forged, hold)
    await wait_depth(channel, hold, 0)  # taken, and dropped
    # A request whose reply_to is a hold queue is refused (dead-lettered), not answered into it.
    request = aio_pika.Message(b'{"user_id": "user_1"}', reply_to=hold, message_id="into-hold", user_id="guest")
    await channel.default_exchange.publish(request, queue_names["REQUEST_QUEUE"])
    await wait_depth(channel, queue_names["DEAD_LETTER_QUEUE"], 1)
    await wait_depth(channel, hold, 0)
    assert fake_clerk.stats.create_calls == 0
    assert replies.answered == 0


async def _balanced() -> None:
    book = ledger.current()
    assert book is not None
    await book.balanced()


async def test_a_key_rotated_by_reload_mid_drain_fails_no_request_and_keeps_the_window_and_the_grants(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """Prod's key rotated (its file rewritten, the instances read again) mid-drain: no request failed.

    At most the limit in any second over both keys, the new key used from then on; a token given
    before is revoked through the queue after.
    """
    key_file = tmp_path / "prod.key"
    key_file.write_text(PROD_KEY)
    path = tmp_path / "instances.toml"
    path.write_text(
        f'[instances.prod]\nsecret_key_file = "{key_file}"\napi_url = "{fake_clerk.url}"\n'
        "rate_limit = 20\nrate_window_seconds = 1\n"
    )
    new_key = "sk_test_" + "n" * 32
    fake_clerk.accepted_keys |= {PROD_KEY, new_key}
    fake_clerk.rate_window_seconds = 1.0
    fake_clerk.rate_limits = {PROD_KEY: 20, new_key: 20}
    worker = await start_worker(clerk_instances_file=str(path))
    prod = await replies_to(channel, queue_names, "prod")
    mine = await replies_to(channel, queue_names, "mine")
    await channel.default_exchange.publish(
        aio_pika.Message(
            b'{"user_id": "user_g"}', reply_to=mine.queue, correlation_id="g", user_id="guest", headers=PROD
        ),
        queue_names["REQUEST_QUEUE"],
    )
    await wait_until(lambda: mine.answered == 1, what="a token given before the rotation")
    await publish_requests(channel, queue_names["BULK_QUEUE"], prod.queue, 60, prefix="p", headers=PROD)
    await wait_until(lambda: prod.answered >= 15, what="the drain under way")
    # A bad file keeps the instances in force.
    path.write_text(path.read_text() + "[instances.bad]\n")
    assert not await worker.reload_instances()
    path.write_text(path.read_text().removesuffix("[instances.bad]\n"))
    key_file.write_text(new_key + "\n")
    assert await worker.reload_instances()
    rotated_at = prod.answered
    assert rotated_at < 60, "the drain ended before the rotation: the test proves nothing"
    await wait_until(lambda: prod.answered == 60, timeout=15, what="every request answered")
    assert prod.outcomes == {"created": 60}
    assert len(fake_clerk.stats.accepted_at.get(new_key, [])) >= 60 - rotated_at - 20
    assert fake_clerk.stats.busiest_window(PROD_KEY, 1.0, new_key) <= 20
    assert fake_clerk.stats.rate_limited == 0
    # A token given under the old key is revoked through the queue under the new one (the grants are the instance's).
    await _balanced()  # before the caller revokes one of its own
    token_id = next(iter(mine.tokens["g"]))
    revoke = aio_pika.Message(
        b'{"sign_in_token_id": "%s"}' % token_id.encode(),
        reply_to=mine.queue,
        correlation_id="rv",
        user_id="guest",
        headers=PROD,
    )
    await channel.default_exchange.publish(revoke, queue_names["REVOKE_QUEUE"])
    await wait_until(lambda: mine.answered == 2, what="the revocation's answer")
    assert mine.outcomes == {"created": 1, "revoked": 1}
