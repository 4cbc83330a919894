"""Fault 8: a broker memory alarm blocks the worker's connection in the middle of a drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.integration.test_blocked import CLEAR_ALARM, SET_ALARM
from tests.ledger import Ledger
from tests.workers import WorkerProcesses, count_replies, publish_requests, worker_env

pytestmark = pytest.mark.slow


async def test_a_memory_alarm_longer_than_the_confirm_timeout_loses_and_duplicates_nothing(
    node: LocalBroker,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
    tmp_path: Path,
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """The alarm outlasts CONFIRM_TIMEOUT_SECONDS: every request answered once, one token each, after it clears."""
    sent = figures.scale(1_000, 5_000)
    alarm_seconds = figures.scale(8, 45)
    confirm_timeout = figures.scale(2, 30)
    fake_clerk.latency_seconds = 0.02
    env = worker_env(
        node.url, fake_clerk.url, queue_names, UPSTREAM_CONCURRENCY="4", CONFIRM_TIMEOUT_SECONDS=str(confirm_timeout)
    )
    pool = WorkerProcesses(tmp_path, env)
    try:
        connection = await aio_pika.connect_robust(node.url, client_properties={"connection_name": "fault-8"})
        channel = await connection.channel()
        replies, reply_queue = await count_replies(channel, "fault8.replies")
        worker = await pool.start()
        await publish_requests(channel, queue_names["REQUEST_QUEUE"], reply_queue.name, sent)
        await wait_until(lambda: replies.answered >= sent // 10, what="the drain to be under way")
        await node.ctl("eval", SET_ALARM)
        answered_at_alarm = replies.answered
        try:
            await asyncio.sleep(alarm_seconds)  # wait-ok: how long the alarm lasts is the fault itself
            answered_during = replies.answered - answered_at_alarm
        finally:
            await node.ctl("eval", CLEAR_ALARM)
        await wait_until(lambda: replies.answered == sent, timeout=180, what="every request answered")
        events = pool.events()
        figures.record(
            "blocked connection",
            sent=sent,
            alarm_s=alarm_seconds,
            confirm_timeout_s=confirm_timeout,
            answered_during_alarm=answered_during,
            lost=sent - replies.answered,
            duplicate_replies=replies.duplicates,
            duplicate_tokens=fake_clerk.stats.duplicated,
            returned_as_fate_unknown=sum(1 for e in events if e.get("reason") == "reply_fate_unknown"),
        )
        assert worker.alive()
        assert answered_at_alarm < sent, "the drain ended before the alarm: the test proves nothing"
        assert replies.duplicates == 0
        assert fake_clerk.stats.duplicated == 0
        await token_ledger.balanced()
        await connection.close()
    finally:
        pool.kill_all()
