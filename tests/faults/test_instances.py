"""Fault 14: two Clerk instances behind the same worker processes: their limits, a key rejected, a key rotated.

Real worker processes, a real broker, Redis where replicas share state, and the stand-in Clerk,
which takes both instances' keys and limits each on its own (1 s windows, so a run is seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
import uuid
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from service.local.redis_server import LocalRedis
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.instances import PROD, PROD_KEY, STAGING, STAGING_KEY, limited, replies_to
from tests.instances import instances_file as write_instances
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests, readyz

pytestmark = pytest.mark.slow


def instances_file(tmp_path: Path, fake_clerk: FakeClerk, prod_limit: int, staging_limit: int, **files: str) -> str:
    """Prod and staging at the stand-in Clerk, each its limit in a 1 s window (a key file where ``files`` names one)."""
    fake_clerk.rate_window_seconds = 1.0
    fake_clerk.rate_limits = {PROD_KEY: prod_limit, STAGING_KEY: staging_limit}
    fake_clerk.accepted_keys |= {PROD_KEY, STAGING_KEY}
    lines = {name: limited(limit) for name, limit in (("prod", prod_limit), ("staging", staging_limit))}
    for name, key_file in files.items():
        lines[name] += f'secret_key_file = "{key_file}"\n'
    return write_instances(tmp_path / "instances.toml", fake_clerk, **lines)


async def two_reply_queues(channel: AbstractChannel, queue_names: dict[str, str]) -> tuple[Replies, Replies]:
    return await replies_to(channel, queue_names, "prod"), await replies_to(channel, queue_names, "staging")


@pytest.mark.parametrize("replicas", [1, 3])
async def test_two_instances_each_driven_at_its_own_limit_get_no_429(
    replicas: int,
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
    tmp_path: Path,
) -> None:
    """Prod at 40 calls a second, staging at 10: both backlogs drain side by side, each at its limit, no 429."""
    seconds = figures.scale(4, 20)
    path = instances_file(tmp_path, fake_clerk, 40, 10)
    prod, staging = await two_reply_queues(channel, queue_names)
    async with LocalRedis() as redis:
        env = {"CLERK_INSTANCES_FILE": path, "REDIS_URL": redis.url}
        for _ in range(replicas):
            await worker_processes.start(**env)
        bulk = queue_names["BULK_QUEUE"]
        started = time.monotonic()
        await publish_requests(channel, bulk, staging.queue, 10 * seconds, prefix="s", headers=STAGING)
        await publish_requests(channel, bulk, prod.queue, 40 * seconds, prefix="p", headers=PROD)
        await wait_until(lambda: prod.answered == 40 * seconds, timeout=60, what="prod's backlog")
        prod_took = time.monotonic() - started
        await wait_until(lambda: staging.answered == 10 * seconds, timeout=60, what="staging's backlog")
        staging_took = time.monotonic() - started
    stats = fake_clerk.stats
    figures.record(
        f"two instances at their limits, {replicas} replica(s)",
        prod_sent=40 * seconds,
        prod_limit_per_s=40,
        prod_rate_per_s=round(40 * seconds / prod_took, 1),
        prod_busiest_1s=stats.busiest_window(PROD_KEY, 1.0),
        staging_sent=10 * seconds,
        staging_limit_per_s=10,
        staging_rate_per_s=round(10 * seconds / staging_took, 1),
        staging_busiest_1s=stats.busiest_window(STAGING_KEY, 1.0),
        calls_answered_429=stats.rate_limited,
    )
    assert prod.outcomes == {"created": 40 * seconds}
    assert staging.outcomes == {"created": 10 * seconds}
    assert stats.busiest_window(PROD_KEY, 1.0) <= 40
    assert stats.busiest_window(STAGING_KEY, 1.0) <= 10
    assert stats.rate_limited == 0
    # Each at its own limit: the first second's burst, then the limit (a tenth to spare for the machine).
    assert prod_took >= seconds - 1
    assert staging_took >= seconds - 1
    assert staging_took < (seconds - 1) * 1.5 + 2
    await token_ledger.balanced()


async def _interactive_latencies(
    channel: AbstractChannel, queue: str, count: int, interval: float, book: Ledger
) -> tuple[list[float], int]:
    """Publish ``count`` interactive requests for prod every ``interval`` s; their latencies, and those unanswered.

    Each token received is told to the ledger ``book``.
    """
    replies = await channel.declare_queue(exclusive=True)
    sent: dict[str, float] = {}
    latencies: dict[str, float] = {}
    done = asyncio.Event()

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = message.correlation_id or ""
        if key in sent:
            latencies[key] = time.monotonic() - sent[key]
            token = json.loads(message.body).get("sign_in_token")
            if token is not None:
                book.delivered(token["id"], "interactive", key)
            if len(latencies) == count:
                done.set()

    await replies.consume(on_reply, no_ack=True)
    for _ in range(count):
        key = uuid.uuid4().hex
        sent[key] = time.monotonic()
        message = aio_pika.Message(b'{"user_id": "user_i"}', correlation_id=key, reply_to=replies.name, headers=PROD)
        await channel.default_exchange.publish(message, queue)
        await asyncio.sleep(interval)  # wait-ok: the pace of the requests is the load itself
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=10)
    return sorted(latencies.values()), count - len(latencies)


async def test_a_rejected_key_on_one_instance_leaves_the_other_its_rate_and_its_interactive_latency(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
    tmp_path: Path,
) -> None:
    """Staging's key refused with its backlog queued: prod's bulk drains at prod's limit, its interactive stays fast.

    Staging's requests wait in its hold queue, and are all answered once its key works again.
    """
    seconds = figures.scale(5, 30)
    path = instances_file(tmp_path, fake_clerk, 40, 40)
    fake_clerk.accepted_keys.discard(STAGING_KEY)
    prod, staging = await two_reply_queues(channel, queue_names)
    worker = await worker_processes.start(CLERK_INSTANCES_FILE=path, PROBE_MAX_INTERVAL_SECONDS="1")
    bulk = queue_names["BULK_QUEUE"]
    await publish_requests(channel, bulk, staging.queue, 400, prefix="s", headers=STAGING)
    await publish_requests(channel, bulk, prod.queue, 40 * seconds, prefix="p", headers=PROD)
    started = time.monotonic()
    latencies, unanswered = await _interactive_latencies(
        channel, queue_names["REQUEST_QUEUE"], 5 * seconds, 0.2, token_ledger
    )
    await wait_until(lambda: prod.answered == 40 * seconds, timeout=60, what="prod's backlog")
    prod_took = time.monotonic() - started
    ready_while_held = await readyz(worker.port)
    staging_while_held = staging.answered
    fake_clerk.accepted_keys.add(STAGING_KEY)
    await wait_until(lambda: staging.answered == 400, timeout=60, what="staging's requests, its key working again")
    figures.record(
        "one instance's key rejected",
        prod_bulk=40 * seconds,
        prod_limit_per_s=40,
        prod_rate_per_s=round(40 * seconds / prod_took, 1),
        prod_busiest_1s_all_calls=fake_clerk.stats.busiest_window(PROD_KEY, 1.0),
        prod_interactive=len(latencies) + unanswered,
        prod_interactive_p50_ms=round(statistics.median(latencies) * 1000, 1),
        prod_interactive_max_ms=round(latencies[-1] * 1000, 1),
        prod_interactive_unanswered=unanswered,
        staging_held=400,
        staging_answered_while_held=staging_while_held,
        readyz_while_held=ready_while_held,
        staging_created_after=staging.outcomes["created"],
    )
    assert prod.outcomes == {"created": 40 * seconds}
    assert unanswered == 0
    assert statistics.median(latencies) < 0.5
    assert prod_took < seconds * 1.5 + 2  # prod's full rate: the limit, not staging's trouble, sets the pace
    assert (staging_while_held, ready_while_held) == (0, 200)
    assert staging.outcomes == {"created": 400}
    assert fake_clerk.stats.busiest_window(PROD_KEY, 1.0) <= 40
    await token_ledger.balanced()


async def test_a_key_rotated_by_sighup_mid_load_fails_no_request(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
    tmp_path: Path,
) -> None:
    """Three workers drain prod at its limit; its key file is rewritten and SIGHUP sent to each: nothing fails.

    The old key stops working at Clerk once every worker has said it reloaded, as an operator
    retiring it would do.
    """
    seconds = figures.scale(6, 30)
    key_file = tmp_path / "prod.key"
    key_file.write_text(PROD_KEY)
    path = instances_file(tmp_path, fake_clerk, 40, 10, prod=str(key_file))
    new_key = "sk_test_" + "r" * 32
    fake_clerk.accepted_keys.add(new_key)
    fake_clerk.rate_limits[new_key] = 40
    prod, _ = await two_reply_queues(channel, queue_names)
    async with LocalRedis() as redis:
        workers = [await worker_processes.start(CLERK_INSTANCES_FILE=path, REDIS_URL=redis.url) for _ in range(3)]
        sent = 40 * seconds
        await publish_requests(channel, queue_names["BULK_QUEUE"], prod.queue, sent, prefix="p", headers=PROD)
        await wait_until(lambda: prod.answered >= sent // 3, timeout=30, what="the drain under way")
        key_file.write_text(new_key)
        rotated_at = prod.answered
        for worker in workers:
            worker.process.send_signal(signal.SIGHUP)

        def reloaded() -> int:
            return sum(1 for event in worker_processes.events() if event["event"] == "instances_reloaded")

        await wait_until(lambda: reloaded() == 3, timeout=20, what="every worker's reload")
        fake_clerk.accepted_keys.discard(PROD_KEY)  # the old key retired at Clerk
        await wait_until(lambda: prod.answered == sent, timeout=60, what="every request answered")
    stats = fake_clerk.stats
    old_calls, new_calls = (stats.accepted_at.get(key, []) for key in (PROD_KEY, new_key))
    busiest = stats.busiest_window(PROD_KEY, 1.0, new_key)
    figures.record(
        "key rotated by SIGHUP mid-load",
        sent=sent,
        answered_at_rotation=rotated_at,
        calls_with_old_key=len(old_calls),
        calls_with_new_key=len(new_calls),
        busiest_1s_both_keys=busiest,
        limit_per_s=40,
        calls_answered_429=stats.rate_limited,
        created=prod.outcomes["created"],
    )
    assert rotated_at < sent, "the drain ended before the rotation: the test proves nothing"
    assert prod.outcomes == {"created": sent}
    assert new_calls
    assert busiest <= 40
    assert stats.rate_limited == 0
    await token_ledger.balanced()


async def test_an_outage_of_one_instance_leaves_the_other_served_and_loses_nothing(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
    tmp_path: Path,
) -> None:
    """Clerk answers 503 to staging for a while, with both backlogs queued: prod drains; staging's wait, then drain."""
    outage_seconds = figures.scale(4, 30)
    path = instances_file(tmp_path, fake_clerk, 40, 40)
    fake_clerk.down_keys.add(STAGING_KEY)
    prod, staging = await two_reply_queues(channel, queue_names)
    await worker_processes.start(CLERK_INSTANCES_FILE=path, OUTAGE_FAILURE_THRESHOLD="3")
    bulk = queue_names["BULK_QUEUE"]
    await publish_requests(channel, bulk, staging.queue, 200, prefix="s", headers=STAGING)
    await publish_requests(channel, bulk, prod.queue, 40 * outage_seconds, prefix="p", headers=PROD)
    started = time.monotonic()
    await wait_until(lambda: prod.answered == 40 * outage_seconds, timeout=60, what="prod's backlog")
    prod_took = time.monotonic() - started
    staging_during = staging.answered
    fake_clerk.down_keys.clear()
    await wait_until(lambda: staging.answered == 200, timeout=60, what="staging's requests after its outage")
    events = worker_processes.events()
    figures.record(
        "one instance's outage",
        prod_sent=40 * outage_seconds,
        prod_rate_per_s=round(40 * outage_seconds / prod_took, 1),
        prod_limit_per_s=40,
        staging_sent=200,
        staging_answered_during_outage=staging_during,
        staging_created_after=staging.outcomes["created"],
        held_lines=sum(1 for e in events if e["event"] == "upstream_unavailable_pausing"),
    )
    assert prod.outcomes == {"created": 40 * outage_seconds}
    assert prod_took < outage_seconds * 1.5 + 2
    assert staging_during == 0
    assert staging.outcomes == {"created": 200}
    await token_ledger.balanced()
