"""Fault 1: worker replicas killed at random while thousands of requests are in flight."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests

pytestmark = pytest.mark.slow


async def _kill_replicas_while_draining(
    worker_processes: WorkerProcesses,
    channel: AbstractChannel,
    queue: str,
    replies: Replies,
    sent: int,
    copies: int,
) -> int:
    """Queue ``sent`` requests (``copies`` of each), run three replicas, SIGKILL one every 1.5 s; return the kills.

    The backlog is queued first; each replica makes at most 8 calls at once at 50 ms, so the
    drain takes long enough for several kills to land mid-flight.
    """
    await worker_processes.start()  # declares the queues
    for _ in range(copies):
        await publish_requests(channel, queue, replies.queue, sent)
    replicas = [worker_processes.started[0], *[await worker_processes.start() for _ in range(2)]]
    chooser = random.Random(3)
    kills = 0
    deadline = time.monotonic() + 300
    while sum(replies.per_request.values()) < sent * copies and time.monotonic() < deadline:
        await asyncio.sleep(1.5)  # wait-ok: the fault schedule, not synchronisation
        victim = chooser.randrange(len(replicas))
        await worker_processes.stop(replicas[victim], signal.SIGKILL)
        replicas[victim] = worker_processes.spawn()
        kills += 1
    await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
    return kills


async def test_replicas_killed_at_random_lose_no_request(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Three replicas, one SIGKILLed every 1.5 s and restarted: every request is answered."""
    sent = figures.scale(5_000, 20_000)
    fake_clerk.latency_seconds = 0.05
    worker_processes.env |= {"UPSTREAM_CONCURRENCY": "8", "PREFETCH": "50"}
    kills = await _kill_replicas_while_draining(
        worker_processes, channel, queue_names["REQUEST_QUEUE"], replies, sent, copies=1
    )
    figures.record(
        "worker killed",
        sent=sent,
        answered=replies.answered,
        lost=sent - replies.answered,
        kills=kills,
        duplicate_replies=replies.duplicates,
        duplicate_tokens=fake_clerk.stats.duplicated,
        revoked=len(fake_clerk.stats.revoked),
    )
    assert replies.answered == sent
    assert kills >= 3, "the work finished before the faults: the test proves little"
    assert "Traceback" not in worker_processes.logs()
    # A SIGKILL cuts the calls its replica had at Clerk: at most UPSTREAM_CONCURRENCY (8) tokens unheld a
    # kill. Without a shared store, a request answered but not yet acknowledged is answered again with
    # another token after the kill: at most PREFETCH (50) a kill.
    await token_ledger.balanced(cut=kills * 8, reissued=kills * 50)


async def test_replicas_killed_with_a_shared_store_never_give_one_message_id_two_tokens(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    redis_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """The same fault with REDIS_URL, each request published twice: every reply to a message_id has one token."""
    sent = figures.scale(2_500, 10_000)
    fake_clerk.latency_seconds = 0.05
    worker_processes.env |= {"UPSTREAM_CONCURRENCY": "8", "PREFETCH": "50", "REDIS_URL": redis_url}
    kills = await _kill_replicas_while_draining(
        worker_processes, channel, queue_names["REQUEST_QUEUE"], replies, sent, copies=2
    )
    await wait_until(lambda: sum(replies.per_request.values()) >= 2 * sent, timeout=120, what="both copies answered")
    figures.record(
        "worker killed, shared store",
        sent=f"{sent}x2",
        answered=replies.answered,
        lost=sent - replies.answered,
        kills=kills,
        tokens_per_message_id=sorted(replies.tokens_per_request()),
        clerk_calls=fake_clerk.stats.create_calls,
        revoked=len(fake_clerk.stats.revoked),
    )
    assert replies.tokens_per_request() == {1}
    assert kills >= 3, "the work finished before the faults: the test proves little"
    assert "Traceback" not in worker_processes.logs()
    # A SIGKILL cuts the calls its replica had at Clerk: at most UPSTREAM_CONCURRENCY (8) tokens unheld a kill.
    await token_ledger.balanced(cut=kills * 8)
