"""Fault 2: the broker restarted (same data directory) with requests in flight."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import pytest

from service.config import load_settings
from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.ledger import Ledger
from tests.workers import WorkerProcesses, count_replies, publish_requests, readyz, worker_env

pytestmark = pytest.mark.slow


async def test_broker_restart_loses_nothing_and_the_worker_resumes_by_itself(
    node: LocalBroker,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
    tmp_path: Path,
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Stop and start the node mid-drain: all answered, the same worker process consumes again."""
    sent = figures.scale(2_000, 10_000)
    fake_clerk.latency_seconds = 0.02
    pool = WorkerProcesses(tmp_path, worker_env(node.url, fake_clerk.url, queue_names, UPSTREAM_CONCURRENCY="8"))
    try:
        connection = await aio_pika.connect_robust(node.url, client_properties={"connection_name": "fault-2"})
        channel = await connection.channel()
        replies, reply_queue = await count_replies(channel, "fault2.replies")
        worker = await pool.start()
        await publish_requests(channel, queue_names["REQUEST_QUEUE"], reply_queue.name, sent)
        await wait_until(lambda: replies.answered >= sent // 10, what="the drain to be under way")
        await node.stop_async()
        answered_at_stop = replies.answered
        restarted = time.monotonic()
        await node.start()
        node_up = time.monotonic()
        resumed_after: float | None = None
        while resumed_after is None and time.monotonic() - node_up < 60:
            if await readyz(worker.port) == 200:
                resumed_after = time.monotonic() - node_up
            await asyncio.sleep(0.1)  # wait-ok: the poll interval of a measured wait
        await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
        figures.record(
            "broker restarted",
            sent=sent,
            in_flight_at_stop=sent - answered_at_stop,
            answered=replies.answered,
            lost=sent - replies.answered,
            duplicate_replies=replies.duplicates,
            node_boot_s=round(node_up - restarted, 1),
            consuming_again_after_node_up_s=round(resumed_after or -1, 1),
            worker_restarted=not worker.alive(),
        )
        events = pool.events()
        assert not [e for e in events if e["level"] in {"error", "critical"}]
        # One line for the loss and one for the return, not one per reconnect attempt.
        assert sum(1 for e in events if e["event"] == "broker_connection_lost") <= 2
        # A request in flight at the stop may say once that its reply or its ack was lost, and once an
        # attempt that its audit event was not confirmed: at most what prefetch lets the worker hold
        # (both lanes). The other warnings: the start's (no policy, the in-process rate limit) and the loss's.
        settings = load_settings({})
        once = {"reply_fate_unknown", "ack_lost"}
        warnings = [e["event"] for e in events if e["level"] == "warning"]
        per_request = [e for e in warnings if e in once or e == "audit_event_unconfirmed"]
        assert len(warnings) - len(per_request) <= 5, warnings
        assert len([e for e in per_request if e in once]) <= 2 * settings.prefetch, warnings
        assert per_request.count("audit_event_unconfirmed") <= 2 * settings.prefetch * settings.max_attempts, warnings
        assert worker.alive()
        assert resumed_after is not None
        assert answered_at_stop < sent, "the drain ended before the restart: the test proves nothing"
        await token_ledger.balanced()
        await connection.close()
    finally:
        pool.kill_all()
