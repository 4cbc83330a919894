"""Fault 7: Clerk rejects the key while a large backlog waits; then the key works again."""

from __future__ import annotations

import pytest
from aio_pika.abc import AbstractChannel

from service.local.fake_clerk import FakeClerk
from tests.conftest import SECRET_KEY, wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, publish_requests, readyz

pytestmark = pytest.mark.slow


async def test_rejected_key_sends_no_reply_and_every_request_is_answered_after(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """10,000 queued requests and a rejected key: no reply while it is bad, all answered once it works."""
    sent = figures.scale(10_000, 50_000)
    worker = await worker_processes.start(PROBE_MAX_INTERVAL_SECONDS="1")
    fake_clerk.accepted_keys = {"sk_test_rotated"}
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, sent)
    await wait_until(lambda: fake_clerk.stats.create_calls > 0, what="the first 401")
    status_while_bad = await readyz(worker.port)
    calls_at_pause = fake_clerk.stats.create_calls
    await wait_until(lambda: fake_clerk.stats.create_calls >= calls_at_pause + 3, timeout=30, what="three probes")
    replies_while_bad = replies.answered
    fake_clerk.accepted_keys = {SECRET_KEY}
    await wait_until(lambda: replies.answered == sent, timeout=180, what="every request answered")
    figures.record(
        "bad key at scale",
        queued=sent,
        rejected_calls=fake_clerk.stats.create_calls - fake_clerk.stats.created,
        readyz_while_bad=status_while_bad,
        replies_while_bad=replies_while_bad,
        answered_after=replies.answered,
        created=replies.outcomes["created"],
        duplicate_replies=replies.duplicates,
    )
    assert (replies_while_bad, status_while_bad) == (0, 503)
    assert replies.outcomes["created"] == sent
    assert await readyz(worker.port) == 200
    await token_ledger.balanced()
