"""Fixtures: a real RabbitMQ node, a real (fake) Clerk server, workers and clients.

The session starts one private RabbitMQ node with the same code the demo
uses, unless AMQP_URL names a broker. Every test gets its own queue names,
so tests never see each other's messages, and what a test declares is
deleted after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
import redis.asyncio
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.connection import broker_user

from service.config import Settings, load_settings
from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from service.local.redis_server import LocalRedis
from service.worker.lifecycle import Worker
from tests import ledger

if TYPE_CHECKING:
    from tests.workers import Replies, WorkerProcesses

SECRET_KEY = "sk_test_" + "k" * 32


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--long``: the fault suite's bigger numbers (documented; CI runs the short mode)."""
    parser.addoption("--long", action="store_true", default=False, help="run faults with their long figures")


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:  # noqa: ASYNC109
    """Poll ``condition`` until it holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)  # wait-ok: the poll interval of a condition wait


@pytest.fixture(scope="session")
async def session_node() -> AsyncIterator[LocalBroker | None]:
    """The session's private node, or None when AMQP_URL names a broker of its own."""
    if os.environ.get("AMQP_URL"):
        yield None
        return
    async with LocalBroker() as node:
        yield node


@pytest.fixture(scope="session")
async def amqp_url(session_node: LocalBroker | None) -> AsyncIterator[str]:
    """The broker every test uses: AMQP_URL, or a private node for the session.

    The tests' workers log in as the URL's user, so that is the service user whose replies the
    clients and the bulk tool accept (SERVICE_USER, for the processes the tests start too).
    """
    url = session_node.url if session_node is not None else os.environ["AMQP_URL"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SERVICE_USER", broker_user(url))
        yield url


# Broker users the policy tests publish as (RabbitMQ sets a message's user_id to its connection's user).
CALLERS = ("support-portal", "billing", "outsider")


@pytest.fixture(scope="session")
async def caller_urls(session_node: LocalBroker | None) -> dict[str, str]:
    """An AMQP URL for each of CALLERS, users made on the session's node (password = name)."""
    if session_node is None:
        pytest.skip("needs users made with rabbitmqctl on the tests' own broker; AMQP_URL names another")
    names = ", ".join(f'<<"{name}">>' for name in CALLERS)
    await session_node.ctl(
        "eval",
        f'[begin catch rabbit_auth_backend_internal:add_user(U, U, <<"tests">>), '
        f'rabbit_auth_backend_internal:set_permissions(U, <<"/">>, <<".*">>, <<".*">>, <<".*">>, '
        f'<<"tests">>) end || U <- [{names}]].',
    )
    return {name: session_node.url.replace("guest:guest", f"{name}:{name}") for name in CALLERS}


@pytest.fixture(scope="session")
async def redis_server() -> AsyncIterator[str]:
    """The Redis every test that asks for one uses: REDIS_URL, or a private server for the session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    async with LocalRedis() as server:
        yield server.url


@pytest.fixture
async def redis_url(redis_server: str) -> str:
    """REDIS_URL for this test, its database emptied first."""
    client = redis.asyncio.Redis.from_url(redis_server)
    await client.flushdb()
    await client.aclose()
    return redis_server


@pytest.fixture
async def node() -> AsyncIterator[LocalBroker]:
    """A private broker of this test's own, to stop and restart."""
    async with LocalBroker() as broker:
        yield broker


@pytest.fixture
async def amqp(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[AbstractRobustConnection]:
    """A connection for the test itself, named after the test."""
    connection = await aio_pika.connect_robust(amqp_url, client_properties={"connection_name": request.node.name})
    yield connection
    await connection.close()


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AbstractChannel:
    """A channel with publisher confirms on the test's connection."""
    return await amqp.channel()


@pytest.fixture
async def fake_clerk() -> AsyncIterator[FakeClerk]:
    """A fake Clerk accepting SECRET_KEY, on a free loopback port; its tokens kept in a ledger."""
    clerk = FakeClerk(SECRET_KEY, seed=1)
    await clerk.start()
    ledger.CURRENT.append(ledger.Ledger(clerk))
    yield clerk
    ledger.CURRENT.pop()
    await clerk.stop()


@pytest.fixture
def token_ledger(fake_clerk: FakeClerk) -> ledger.Ledger:
    """The ledger of this test's fake Clerk: who received each token it made."""
    current = ledger.current()
    assert current is not None
    return current


# The instances tests name, whose hold queues are deleted after each test.
HOLD_QUEUES_OF = ("default", "prod", "staging")


@pytest.fixture
async def queue_names(amqp: AbstractRobustConnection) -> AsyncIterator[dict[str, str]]:
    """Queue names private to this test; those queues (and its `.replies` queue) are deleted after it."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    names = {
        "REQUEST_QUEUE": f"{prefix}.create",
        "BULK_QUEUE": f"{prefix}.create.bulk",
        "RESULTS_QUEUE": f"{prefix}.results",
        "DEAD_LETTER_QUEUE": f"{prefix}.dead",
        "IMPERSONATION_QUEUE": f"{prefix}.impersonate",
        "REVOKE_QUEUE": f"{prefix}.revoke",
        "REVOCATIONS_QUEUE": f"{prefix}.revocations",
        "HOLD_QUEUE_PREFIX": f"{prefix}.hold",
    }
    yield names
    cleanup = await amqp.channel()
    holds = [f"{prefix}.hold.{instance}{kind}" for instance in HOLD_QUEUES_OF for kind in ("", ".bulk", ".revocations")]
    for name in (*names.values(), reply_queue_name(names), *holds):
        with contextlib.suppress(Exception):
            await cleanup.queue_delete(name)
    with contextlib.suppress(Exception):
        await cleanup.close()


def reply_queue_name(queue_names: dict[str, str]) -> str:
    """The durable reply queue of a test's ``replies`` fixture."""
    return f"{queue_names['REQUEST_QUEUE']}.replies"


@pytest.fixture
async def replies(channel: AbstractChannel, queue_names: dict[str, str]) -> Replies:
    """Every reply to this test's reply queue, counted (`replies.queue` is its name)."""
    from tests.workers import count_replies  # noqa: PLC0415 - tests.workers imports this module

    counter, _ = await count_replies(channel, reply_queue_name(queue_names))
    return counter


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(amqp_url: str, fake_clerk: FakeClerk, queue_names: dict[str, str]) -> SettingsFactory:
    """Settings for a worker of this test; keyword overrides by variable name."""

    def make(**overrides: Any) -> Settings:
        env = {
            "AMQP_URL": amqp_url,
            "CLERK_API_URL": fake_clerk.url,
            "CLERK_SECRET_KEY": SECRET_KEY,
            "HTTP_PORT": "0",
            "HTTP_HOST": "127.0.0.1",
            "RETRY_BASE_SECONDS": "0.01",
            "RETRY_MAX_DELAY_SECONDS": "2",
            "PROBE_MAX_INTERVAL_SECONDS": "0.2",
            # The grace period covers one call to Clerk (REQUEST_TIMEOUT_SECONDS + 3): config checks it.
            "SHUTDOWN_GRACE_SECONDS": "8",
            "REQUEST_TIMEOUT_SECONDS": "5",
            "STARTUP_TIMEOUT_SECONDS": "10",
            # Far above any test's load: tests of the limit set their own.
            "CLERK_RATE_LIMIT": "1000000",
            **queue_names,
        }
        env.update({k.upper(): str(v) for k, v in overrides.items()})
        return load_settings(env)

    return make


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(make_settings: SettingsFactory) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers (settings overrides as keywords); stopped after the test."""
    workers: list[Worker] = []

    async def start(**overrides: Any) -> Worker:
        worker = Worker(make_settings(**overrides), name=f"test-worker-{len(workers)}")
        workers.append(worker)
        await worker.start()
        return worker

    yield start
    for worker in workers:
        await worker.shutdown()


@pytest.fixture
async def worker(start_worker: WorkerFactory) -> Worker:
    """One worker with the test defaults."""
    return await start_worker()


@pytest.fixture
async def client(
    amqp_url: str, queue_names: dict[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[SignInTokenClient]:
    """A client of this test's queues, with a reply queue of its own (tests look into it)."""
    async with SignInTokenClient(
        amqp_url,
        request_queue=queue_names["REQUEST_QUEUE"],
        bulk_queue=queue_names["BULK_QUEUE"],
        impersonation_queue=queue_names["IMPERSONATION_QUEUE"],
        revoke_queue=queue_names["REVOKE_QUEUE"],
        replies="queue",
        name=f"client-{request.node.name}",
    ) as token_client:
        yield token_client


async def get_message(
    channel: AbstractChannel,
    queue: str,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> aio_pika.abc.AbstractIncomingMessage:
    """Wait for one message on ``queue`` (declared passively) and return it, acknowledged."""
    declared = await channel.declare_queue(queue, passive=True)
    deadline = time.monotonic() + timeout
    while True:
        message = await declared.get(no_ack=True, fail=False)
        if message is not None:
            return message
        if time.monotonic() > deadline:
            pytest.fail(f"no message on {queue} within {timeout} s")
        await asyncio.sleep(0.02)  # wait-ok: the poll interval of a condition wait


async def queue_depth(channel: AbstractChannel, queue: str) -> int:
    """Messages ready in ``queue``, asked of the broker now.

    Through the underlying channel: a robust channel's ``declare_queue`` hands back the
    queue object it declared first, with that first declaration's count.
    """
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue, passive=True)
    return int(declared.message_count or 0)


async def wait_depth(channel: AbstractChannel, queue: str, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until ``queue`` holds ``count`` ready messages (asked every 50 ms), or fail."""
    deadline = time.monotonic() + timeout
    depth = await queue_depth(channel, queue)
    while depth != count:
        if time.monotonic() > deadline:
            pytest.fail(f"{queue} holds {depth} messages, not {count}, after {timeout:g} s")
        await asyncio.sleep(0.05)  # wait-ok: the poll interval of a condition wait
        depth = await queue_depth(channel, queue)


@pytest.fixture
def worker_processes(
    tmp_path: Path,
    amqp_url: str,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
) -> Iterator[WorkerProcesses]:
    """Worker processes of this test (broker, fake Clerk, queues as the in-process workers')."""
    from tests.workers import WorkerProcesses, worker_env  # noqa: PLC0415 - tests.workers imports this module

    pool = WorkerProcesses(tmp_path, worker_env(amqp_url, fake_clerk.url, queue_names))
    yield pool
    pool.kill_all()


@pytest.fixture
async def connections(caller_urls: dict[str, str]) -> AsyncIterator[dict[str, AbstractRobustConnection]]:
    """A connection as each caller."""
    opened = {name: await aio_pika.connect_robust(url) for name, url in caller_urls.items()}
    yield opened
    for connection in opened.values():
        await connection.close()


@pytest.fixture
def audit_exchange(queue_names: dict[str, str]) -> str:
    """The audit exchange of the test."""
    return f"{queue_names['REQUEST_QUEUE']}.audit"


@pytest.fixture
async def audit_queue(channel: AbstractChannel, audit_exchange: str) -> AsyncIterator[AbstractQueue]:
    """A queue bound to every event of the test's audit exchange (declared here first, as an operator would)."""
    exchange = await channel.declare_exchange(audit_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{audit_exchange}.all", exclusive=True)
    await queue.bind(exchange, "#")
    yield queue
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()


async def events(queue: AbstractQueue, count: int) -> list[tuple[str, dict[str, Any]]]:
    """The next ``count`` events on ``queue``: routing key and body."""
    found: list[tuple[str, dict[str, Any]]] = []
    for _ in range(count):
        message = await get_message(queue.channel, queue.name)
        assert message.content_type == "application/json"
        found.append((str(message.routing_key), json.loads(message.body)))
    return found
