"""The worker as a process: signals, crashes, bad configuration, secrets in its logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel

from service.fake_clerk import FakeClerk
from service.local_broker import free_port
from tests.conftest import SECRET_KEY, WorkerFactory, wait_until

pytestmark = pytest.mark.slow

Spawn = Callable[..., subprocess.Popen[bytes]]


def worker_env(amqp_url: str, clerk_url: str, queue_names: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a worker process for this test."""
    return {
        **os.environ,
        "AMQP_URL": amqp_url,
        "CLERK_API_URL": clerk_url,
        "CLERK_SECRET_KEY": SECRET_KEY,
        "LOG_FORMAT": "json",
        "HTTP_HOST": "127.0.0.1",
        "SHUTDOWN_GRACE_SECONDS": "10",
        **queue_names,
        **extra,
    }


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start worker processes; each logs to its own file; all are killed after the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"worker-{len(processes)}.log").open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 - our own module
                [sys.executable, "-m", "service", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def all_logs(tmp_path: Path) -> str:
    """Everything every worker process wrote."""
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("worker-*.log")))


async def wait_ready(port: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Wait until the worker on ``port`` answers /readyz with 200."""

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    deadline = asyncio.get_running_loop().time() + timeout
    while not await ready():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("worker process did not become ready")
        await asyncio.sleep(0.1)


@pytest.fixture
async def replies(channel: AbstractChannel) -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A durable reply queue and the count of replies seen per correlation id."""
    queue = await channel.declare_queue(f"replies-{os.urandom(4).hex()}", durable=True)
    seen: dict[str, int] = {}

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen[message.correlation_id or ""] = seen.get(message.correlation_id or "", 0) + 1

    await queue.consume(on_reply, no_ack=True)
    yield queue.name, seen
    await queue.delete(if_unused=False, if_empty=False)


async def publish_many(channel: AbstractChannel, queue: str, reply_to: str, count: int) -> None:
    """Publish ``count`` valid requests, confirmed."""
    for i in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(
                b'{"user_id": "user_p%d"}' % i,
                correlation_id=f"c{i}",
                message_id=f"m{i}",
                reply_to=reply_to,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            queue,
        )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_worker_stopped_mid_flight_loses_no_request(
    sig: signal.Signals,
    spawn: Spawn,
    amqp_url: str,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
    channel: AbstractChannel,
    replies: tuple[str, dict[str, int]],
    start_worker: WorkerFactory,
    tmp_path: Path,
) -> None:
    """SIGTERM exits 0 within the grace period; SIGKILL is a crash; either way every request is answered after.

    200 requests at 4 x 200 ms take 10 s: more than the 5 s grace, so some are
    finished and the rest returned to the queue.
    """
    reply_queue, seen = replies
    fake_clerk.latency_seconds = 0.2
    port = free_port()
    env = worker_env(amqp_url, fake_clerk.url, queue_names, HTTP_PORT=str(port), UPSTREAM_CONCURRENCY="4")
    process = spawn({**env, "SHUTDOWN_GRACE_SECONDS": "5"}, "worker")
    await wait_ready(port)
    await publish_many(channel, queue_names["REQUEST_QUEUE"], reply_queue, 200)
    await wait_until(lambda: len(seen) >= 4, what="the first replies")
    await wait_until(lambda: '"replied"' in all_logs(tmp_path), what="the first replies in the worker's log")
    signalled = time.monotonic()
    process.send_signal(sig)
    exit_code = await asyncio.to_thread(process.wait, 15)
    assert exit_code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert time.monotonic() - signalled < 5
    assert len(seen) < 200, "the signal came after all the work; the test proves nothing"
    await start_worker(upstream_concurrency=32)
    await wait_until(lambda: len(seen) == 200, timeout=60, what="every request answered after the restart")
    logs = all_logs(tmp_path)
    assert ("worker_stopped" in logs) == (sig == signal.SIGTERM)
    assert "Traceback" not in logs
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    replied = [e for e in events if e["event"] == "replied"]
    assert replied
    assert {"correlation_id", "message_id", "user_id", "lane", "attempts", "outcome"} <= set(replied[0])
    for token in fake_clerk.stats.tokens.values():
        assert token["token"] not in logs
    assert SECRET_KEY not in logs


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the command to completion."""
    return subprocess.run(  # noqa: S603 - our own module
        [sys.executable, "-m", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def base_env() -> dict[str, str]:
    """The environment less every variable the service reads."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "AMQP_", "HTTP_"))}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "CLERK_SECRET_KEY"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "AMQP_URL": "http://nope"}, "AMQP_URL"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "CLERK_API_URL": "not a url"}, "CLERK_API_URL"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "HTTP_PORT": "eighty"}, "HTTP_PORT"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS"),
        ({"CLERK_SECRET_KEY_FILE": "/no/such/file"}, "CLERK_SECRET_KEY_FILE"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(env: dict[str, str], names: str) -> None:
    """A missing key or malformed value: exit 2 and one stderr line naming the variable."""
    result = run_cli("worker", env={**base_env(), **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    assert "sk_test_x" not in result.stderr


def test_unreachable_broker_is_retried_then_one_line_and_nonzero_exit() -> None:
    """No broker within STARTUP_TIMEOUT_SECONDS: one line naming the broker, non-zero exit, no traceback."""
    env = {
        **base_env(),
        "CLERK_SECRET_KEY": "sk_test_x",
        "AMQP_URL": f"amqp://guest:secretpw@127.0.0.1:{free_port()}/",
        "STARTUP_TIMEOUT_SECONDS": "1.5",
        "HTTP_PORT": "0",
        "LOG_LEVEL": "error",
    }
    result = run_cli("worker", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot reach the broker" in lines[0]
    assert "secretpw" not in result.stderr


async def test_request_command_prints_the_reply(
    worker: object,
    amqp_url: str,
    queue_names: dict[str, str],
) -> None:
    """`sign-in-tokens request USER_ID` prints the reply and exits 0 when created, 1 when not."""
    env = {**base_env(), "AMQP_URL": amqp_url, **queue_names}
    created = await asyncio.to_thread(run_cli, "request", "user_cli", "--expires-in", "60", env=env)
    assert created.returncode == 0, created.stderr
    assert '"outcome": "created"' in created.stdout
    missing = await asyncio.to_thread(run_cli, "request", "nobody", env=env)
    assert missing.returncode == 1
    assert '"code": "user_not_found"' in missing.stdout
