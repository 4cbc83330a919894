"""Several Clerk instances at their edges: a reload that rotates, re-limits or removes one; a hold queue deleted.

Found by attacking the hold design; each case failed before its fix. Real broker, the stand-in Clerk.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel

from service.local.clerk_answers import clerk_errors, reply
from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests import ledger
from tests.conftest import WorkerFactory, queue_depth, wait_depth, wait_until
from tests.instances import PROD, PROD_KEY, STAGING, STAGING_KEY, instances_file, limited, replies_to
from tests.workers import publish_requests

NEW_KEY = "sk_test_" + "n" * 32
# A request timeout short enough that a client replaced by a reload is closed within the test.
QUICK_RETIRE: dict[str, Any] = {
    "request_timeout_seconds": 1,
    "connect_timeout_seconds": 0.5,
    "shutdown_grace_seconds": 5,
}


def write(path: Path, fake_clerk: FakeClerk, *, prod: str = "", staging: str | None = "") -> str:
    """Prod and (unless None) staging at the stand-in Clerk; ``prod``/``staging``: more lines for each table."""
    return instances_file(path, fake_clerk, prod=prod, staging=staging)


def held(worker: Worker, instance: str, reason: str) -> float:
    """How many requests ``worker`` moved to ``instance``'s hold queues for ``reason``."""
    return worker.metrics.labelled(worker.metrics.held, instance, reason)._value.get()


async def test_after_a_rotation_an_outage_still_ends_when_clerk_answers(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """The breaker outlives the rotated client: its probe goes through the new one, and the hold ends."""
    key_file = tmp_path / "prod.key"
    key_file.write_text(PROD_KEY)
    path = tmp_path / "instances.toml"
    write(path, fake_clerk, prod=f'secret_key_file = "{key_file}"\n', staging=None)
    fake_clerk.accepted_keys |= {PROD_KEY, NEW_KEY}
    worker = await start_worker(clerk_instances_file=str(path), outage_failure_threshold=2, **QUICK_RETIRE)
    prod = await replies_to(channel, queue_names, "prod")
    old = worker.parts.upstreams["prod"].clerk
    key_file.write_text(NEW_KEY)
    assert await worker.reload_instances()
    await wait_until(lambda: old._session is None, timeout=10, what="the old client closed")
    fake_clerk.down_keys.add(NEW_KEY)
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], prod.queue, 5, prefix="p", headers=PROD)
    await wait_until(lambda: worker.parts.upstreams["prod"].breaker.is_open, what="prod's breaker to open")
    fake_clerk.down_keys.clear()
    await wait_until(lambda: prod.answered == 5, timeout=15, what="prod answered after Clerk came back")
    assert prod.outcomes == {"created": 5}
    book = ledger.current()
    assert book is not None
    await book.balanced()


async def test_requests_waiting_for_a_slot_when_a_reload_changes_the_limit_are_answered(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """2 calls a second, 30 queued, the limit raised to 10 mid-drain: the waiting requests move to the new limiter."""
    path = tmp_path / "instances.toml"
    write(path, fake_clerk, prod=limited(2), staging=None)
    fake_clerk.accepted_keys.add(PROD_KEY)
    worker = await start_worker(clerk_instances_file=str(path), prefetch=30, **QUICK_RETIRE)
    prod = await replies_to(channel, queue_names, "prod")
    await publish_requests(channel, queue_names["BULK_QUEUE"], prod.queue, 30, prefix="b", headers=PROD)
    await wait_until(lambda: prod.answered >= 3, what="the drain under way")
    write(path, fake_clerk, prod=limited(10), staging=None)
    assert await worker.reload_instances()
    await wait_until(lambda: prod.answered == 30, timeout=15, what="every request, at the new limit")
    assert prod.outcomes == {"created": 30}


async def test_a_removed_instances_requests_are_answered_invalid_request_wherever_they_wait(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """Staging removed by a reload: requests held (its key rejected) and requests at its limiter, each answered."""
    path = tmp_path / "instances.toml"
    write(path, fake_clerk, staging=limited(2))
    fake_clerk.accepted_keys.add(PROD_KEY)  # staging's key rejected: its requests are held
    worker = await start_worker(clerk_instances_file=str(path), **QUICK_RETIRE)
    staging = await replies_to(channel, queue_names, "staging")
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], staging.queue, 5, prefix="h", headers=STAGING)
    await wait_depth(channel, f"{queue_names['HOLD_QUEUE_PREFIX']}.staging", 5)
    # The key works again: at 2 a second, most of 20 more wait for a slot when the instance goes.
    fake_clerk.accepted_keys.add(STAGING_KEY)
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], staging.queue, 20, prefix="w", headers=STAGING)
    await wait_until(lambda: staging.answered >= 2, what="staging served")
    write(path, fake_clerk, staging=None)
    assert await worker.reload_instances()
    await wait_until(lambda: staging.answered == 25, timeout=15, what="every staging request answered")
    assert set(staging.outcomes) <= {"created", "invalid_request"}
    assert staging.outcomes["invalid_request"] >= 10
    url = f"http://127.0.0.1:{worker.health.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    assert 'instance="staging"' not in "\n".join(
        line for line in text.splitlines() if line.startswith("sign_in_tokens_instance_check")
    )


async def test_an_order_to_revoke_held_by_its_instance_is_never_dead_lettered(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """A token nobody can receive, its instance's key rejected just after: the order waits, and is carried out."""
    path = write(tmp_path / "instances.toml", fake_clerk)
    fake_clerk.accepted_keys |= {PROD_KEY, STAGING_KEY}

    async def key_revoked_right_after(_: dict[str, Any]) -> None:
        fake_clerk.accepted_keys.discard(STAGING_KEY)

    fake_clerk.on_create = key_revoked_right_after
    await start_worker(clerk_instances_file=path, delivery_limit=3, max_attempts=2, retry_max_delay_seconds=0.5)
    message = aio_pika.Message(b'{"user_id": "user_x"}', reply_to="no-such-queue", message_id="m1", headers=STAGING)
    await channel.default_exchange.publish(message, queue_names["REQUEST_QUEUE"])
    await wait_until(lambda: len(fake_clerk.stats.tokens) == 1, what="the token made")
    fake_clerk.on_create = None
    await wait_depth(channel, f"{queue_names['HOLD_QUEUE_PREFIX']}.staging.revocations", 1)
    revoke_answer = fake_clerk.revoke
    fake_clerk.revoke = lambda *_, **__: reply(503, clerk_errors("service_unavailable", "down"))  # type: ignore[method-assign]
    fake_clerk.accepted_keys.add(STAGING_KEY)
    await wait_until(lambda: fake_clerk.stats.revoke_calls >= 4, timeout=20, what="the revocation tried, and again")
    fake_clerk.revoke = revoke_answer  # type: ignore[method-assign]
    token_id = next(iter(fake_clerk.stats.tokens))
    await wait_until(lambda: token_id in fake_clerk.stats.revoked, timeout=30, what="the token revoked")
    assert await queue_depth(channel, queue_names["DEAD_LETTER_QUEUE"]) == 1  # the request (reply_refused) alone


async def test_a_deleted_hold_queue_is_declared_again_and_nothing_is_burned(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "instances.toml", fake_clerk)
    fake_clerk.accepted_keys.add(PROD_KEY)
    worker = await start_worker(clerk_instances_file=path)
    staging = await replies_to(channel, queue_names, "staging")
    await channel.queue_delete(f"{queue_names['HOLD_QUEUE_PREFIX']}.staging")
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], staging.queue, 3, prefix="s", headers=STAGING)
    await wait_until(lambda: held(worker, "staging", "key_rejected") == 3, what="the three held")
    fake_clerk.accepted_keys.add(STAGING_KEY)
    await wait_until(lambda: staging.answered == 3, timeout=15, what="the held requests answered")
    assert staging.outcomes == {"created": 3}
    assert await queue_depth(channel, queue_names["DEAD_LETTER_QUEUE"]) == 0


async def test_held_interactive_requests_go_ahead_of_the_instances_held_bulk_backlog(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """40 bulk then 3 interactive requests held at 4 calls a second: once the key works, interactive first."""
    path = write(tmp_path / "instances.toml", fake_clerk, staging=limited(4))
    fake_clerk.accepted_keys.add(PROD_KEY)
    await start_worker(clerk_instances_file=path, prefetch=8)
    bulk = await replies_to(channel, queue_names, "bulk-replies")
    interactive = await replies_to(channel, queue_names, "interactive-replies")
    hold = f"{queue_names['HOLD_QUEUE_PREFIX']}.staging"
    await publish_requests(channel, queue_names["BULK_QUEUE"], bulk.queue, 40, prefix="b", headers=STAGING)
    await wait_depth(channel, f"{hold}.bulk", 40)
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], interactive.queue, 3, prefix="i", headers=STAGING)
    await wait_depth(channel, hold, 3)
    fake_clerk.accepted_keys.add(STAGING_KEY)
    started = time.monotonic()
    await wait_until(lambda: interactive.answered == 3, timeout=10, what="the interactive requests")
    assert time.monotonic() - started < 3
    assert bulk.answered <= 10
    await wait_until(lambda: bulk.answered == 40, timeout=20, what="the bulk backlog")


async def test_a_held_requests_dead_letter_names_its_lane_and_its_ttl_holds_in_the_hold_queue(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """A held request whose caller left is dead-lettered naming REQUEST_QUEUE; one whose TTL passed gets no token."""
    path = write(tmp_path / "instances.toml", fake_clerk)
    fake_clerk.accepted_keys.add(PROD_KEY)
    worker = await start_worker(clerk_instances_file=path)
    gone = await channel.declare_queue(f"{queue_names['REQUEST_QUEUE']}.gone", durable=True)
    left = aio_pika.Message(b'{"user_id": "user_d"}', reply_to=gone.name, message_id="d1", headers=STAGING)
    expiring = aio_pika.Message(
        b'{"user_id": "user_t"}', reply_to=gone.name, message_id="t1", expiration=1, headers=STAGING
    )
    for message in (expiring, left):  # a quorum queue expires a message at its head
        await channel.default_exchange.publish(message, queue_names["REQUEST_QUEUE"])
    published = time.monotonic()
    await wait_until(lambda: held(worker, "staging", "key_rejected") >= 2, what="both held")
    await asyncio.sleep(max(0.0, published + 1.5 - time.monotonic()))  # wait-ok: the TTL passing is the fault
    await gone.delete(if_unused=False, if_empty=False)  # the caller went away
    fake_clerk.accepted_keys.add(STAGING_KEY)
    await wait_depth(channel, queue_names["DEAD_LETTER_QUEUE"], 2, timeout=15)
    dead = await channel.declare_queue(queue_names["DEAD_LETTER_QUEUE"], passive=True)
    reasons = {}
    for _ in range(2):
        letter = await dead.get(no_ack=True)
        headers = letter.headers or {}
        reasons[letter.message_id] = headers.get("x-dead-letter-reason") or "expired"
        if letter.message_id == "d1":
            assert headers["x-original-routing-key"] == queue_names["REQUEST_QUEUE"]
            assert headers["x-original-user-id"] == ""
    assert reasons == {"d1": "reply_refused", "t1": "expired"}
    assert len(fake_clerk.stats.tokens) == 1  # d1's, revoked; none for the expired t1
