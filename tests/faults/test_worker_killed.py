"""Fault 1: worker replicas killed at random while thousands of requests are in flight."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest
from aio_pika.abc import AbstractChannel

from service.fake_clerk import FakeClerk
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.workers import Replies, WorkerProcesses, publish_requests

pytestmark = pytest.mark.slow


async def test_replicas_killed_at_random_lose_no_request(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
) -> None:
    """Three replicas, one SIGKILLed every 1.5 s and restarted: every request is answered.

    The backlog is queued first; each replica makes at most 8 calls at once at 50 ms, so the
    drain takes long enough for several kills to land mid-flight.
    """
    sent = figures.scale(5_000, 20_000)
    fake_clerk.latency_seconds = 0.05
    worker_processes.env |= {"UPSTREAM_CONCURRENCY": "8", "PREFETCH": "50"}
    await worker_processes.start()  # declares the queues
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, sent)
    replicas = [worker_processes.started[0], *[await worker_processes.start() for _ in range(2)]]
    chooser = random.Random(3)
    kills = 0
    deadline = time.monotonic() + 300
    while replies.answered < sent and time.monotonic() < deadline:
        await asyncio.sleep(1.5)  # wait-ok: the fault schedule, not synchronisation
        victim = chooser.randrange(len(replicas))
        await worker_processes.stop(replicas[victim], signal.SIGKILL)
        replicas[victim] = worker_processes.spawn()
        kills += 1
    await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
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
