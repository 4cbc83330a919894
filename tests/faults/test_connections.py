"""Fault 4: slow, stalled and reset connections to Clerk and to RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractChannel
from yarl import URL

from service.local.fake_clerk import FakeClerk
from tests.conftest import wait_until
from tests.faults.conftest import Figures
from tests.faults.proxy import FaultyProxy
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcesses, metric, publish_requests, wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture
async def proxy_factory() -> AsyncIterator[list[FaultyProxy]]:
    """Proxies started by the test; stopped after it."""
    proxies: list[FaultyProxy] = []
    yield proxies
    for proxy in proxies:
        await proxy.stop()


async def start_proxy(proxies: list[FaultyProxy], target_port: int) -> FaultyProxy:
    """A running proxy to ``target_port``."""
    proxy = FaultyProxy(target_port)
    await proxy.start()
    proxies.append(proxy)
    return proxy


async def run_phases(proxy: FaultyProxy, seconds: float) -> None:
    """Latency, then a stall, then resets mid-stream, then a healthy link; ``seconds`` each."""
    proxy.latency = 0.05
    await asyncio.sleep(seconds)  # wait-ok: the length of a fault phase
    proxy.latency = 0.0
    proxy.stall()
    await asyncio.sleep(seconds)  # wait-ok: the length of a fault phase
    proxy.unstall()
    proxy.reset_after_bytes = 100
    await asyncio.sleep(seconds)  # wait-ok: the length of a fault phase
    proxy.reset_all()
    proxy.reset_after_bytes = None


async def test_slow_stalled_and_reset_clerk_connections_lose_and_strand_nothing(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    proxy_factory: list[FaultyProxy],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Worker → proxy → Clerk with latency, a stall and resets: every request answered, none stuck."""
    sent = figures.scale(1_500, 10_000)
    proxy = await start_proxy(proxy_factory, fake_clerk.port)
    fake_clerk.latency_seconds = 0.05  # 4 calls at once at 50 ms: the drain spans every phase
    worker = await worker_processes.start(
        CLERK_API_URL=f"http://127.0.0.1:{proxy.port}/v1",
        REQUEST_TIMEOUT_SECONDS="1",
        CONNECT_TIMEOUT_SECONDS="1",
        UPSTREAM_CONCURRENCY="4",
    )
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, sent)
    await run_phases(proxy, figures.scale(4, 20))
    answered_when_healthy = replies.answered
    await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
    stuck = await metric(worker, "sign_in_tokens_in_flight")
    ambiguous = await metric(worker, "sign_in_tokens_ambiguous_creates_total")
    figures.record(
        "Clerk connections cut and slowed",
        sent=sent,
        answered=replies.answered,
        lost=sent - replies.answered,
        stuck=stuck,
        resets=proxy.resets,
        outcomes=dict(replies.outcomes),
        max_attempts_in_a_reply=replies.max_attempts,
        duplicate_tokens=fake_clerk.stats.duplicated,
        ambiguous_creates=ambiguous,
    )
    assert answered_when_healthy < sent, "the drain ended before the faults: the test proves little"
    assert replies.duplicates == 0
    assert stuck == 0
    assert proxy.resets > 0
    # A call cut after it left (a reset mid-answer, a stall past the timeout) may have made a token: counted.
    ledger = await token_ledger.balanced(cut=int(ambiguous))
    assert ledger.orphans <= ambiguous


async def test_slow_stalled_and_reset_broker_connections_lose_and_strand_nothing(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    amqp_url: str,
    channel: AbstractChannel,
    replies: Replies,
    queue_names: dict[str, str],
    proxy_factory: list[FaultyProxy],
    figures: Figures,
    token_ledger: Ledger,
) -> None:
    """Worker → proxy → RabbitMQ with latency, a stall (heartbeat 2 s) and resets: every request answered."""
    sent = figures.scale(1_500, 10_000)
    broker = URL(amqp_url)
    proxy = await start_proxy(proxy_factory, broker.port or 5672)
    fake_clerk.latency_seconds = 0.05  # 4 calls at once at 50 ms: the drain spans every phase
    proxied = broker.with_host("127.0.0.1").with_port(proxy.port).with_query(heartbeat="2")
    worker = await worker_processes.start(AMQP_URL=str(proxied), UPSTREAM_CONCURRENCY="4")
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, sent)
    await run_phases(proxy, figures.scale(6, 20))
    answered_when_healthy = replies.answered
    await wait_until(lambda: replies.answered == sent, timeout=120, what="every request answered")
    await wait_ready(worker.port)
    stuck = await metric(worker, "sign_in_tokens_in_flight")
    events = worker_processes.events()
    figures.record(
        "broker connections cut and slowed",
        sent=sent,
        answered=replies.answered,
        lost=sent - replies.answered,
        stuck=stuck,
        resets=proxy.resets,
        reconnects=sum(1 for e in events if e["event"] == "broker_reconnected"),
        duplicate_replies=replies.duplicates,
        duplicate_tokens=fake_clerk.stats.duplicated,
        answered_from_store=sum(1 for e in events if e["event"] == "answered_from_idempotency_store"),
    )
    assert answered_when_healthy < sent, "the drain ended before the faults: the test proves little"
    assert stuck == 0
    assert worker.alive()
    await token_ledger.balanced()
