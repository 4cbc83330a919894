"""Worker processes, reply counting and bulk publishing, for process and fault tests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from service.local.rabbitmq import free_port
from tests import ledger
from tests.conftest import SECRET_KEY


@dataclass
class WorkerProcess:
    """One ``python -m service worker`` process and where it logs."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.process.poll() is None


class WorkerProcesses:
    """Start, signal and restart worker processes; every one is killed at teardown."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        """Workers will log into ``log_dir`` and run with ``env`` (plus their own HTTP_PORT)."""
        self.log_dir = log_dir
        self.env = env
        self.started: list[WorkerProcess] = []

    def spawn(self, *args: str, **extra_env: str) -> WorkerProcess:
        """Start ``python -m service ARGS`` (default: worker) with extra environment."""
        port = free_port()
        log_path = self.log_dir / f"worker-{len(self.started)}.log"
        env = {**self.env, "HTTP_PORT": str(port), **extra_env}
        with log_path.open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 - our own module
                [sys.executable, "-m", "service", *(args or ("worker",))],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(process, port, log_path)
        self.started.append(worker)
        return worker

    async def start(self, **extra_env: str) -> WorkerProcess:
        """Spawn a worker and wait until it is ready."""
        worker = self.spawn(**extra_env)
        await wait_ready(worker.port)
        return worker

    async def stop(self, worker: WorkerProcess, sig: signal.Signals = signal.SIGKILL, timeout: float = 30) -> int:  # noqa: ASYNC109
        """Signal a worker and wait for it to exit; return its exit code."""
        worker.process.send_signal(sig)
        return await asyncio.to_thread(worker.process.wait, timeout)

    def logs(self) -> str:
        """Everything every worker wrote."""
        return "".join(w.log_path.read_text(errors="replace") for w in self.started)

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log event of every worker."""
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def kill_all(self) -> None:
        """Kill what still runs."""
        for worker in self.started:
            if worker.alive():
                worker.process.kill()
                worker.process.wait()


def worker_env(amqp_url: str, clerk_url: str, queue_names: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a worker process for a test."""
    return {
        **os.environ,
        "AMQP_URL": amqp_url,
        "CLERK_API_URL": clerk_url,
        "CLERK_SECRET_KEY": SECRET_KEY,
        "LOG_FORMAT": "json",
        "HTTP_HOST": "127.0.0.1",
        # The grace period covers one call to Clerk (REQUEST_TIMEOUT_SECONDS + 3): config checks it.
        "SHUTDOWN_GRACE_SECONDS": "10",
        "REQUEST_TIMEOUT_SECONDS": "5",
        "CLERK_RATE_LIMIT": "1000000",
        **queue_names,
        **extra,
    }


async def metric(worker: WorkerProcess, name: str) -> float:
    """The sum of a metric's samples (every label) on the worker's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{worker.port}/metrics") as response:
        text = await response.text()
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


async def readyz(port: int) -> int | None:
    """The status of /readyz on ``port``, or None when nothing answers."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status
    except aiohttp.ClientError:
        return None


async def wait_ready(port: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Wait until the worker on ``port`` answers /readyz with 200."""
    deadline = time.monotonic() + timeout
    while await readyz(port) != 200:
        if time.monotonic() > deadline:
            pytest.fail(f"worker on port {port} did not become ready")
        await asyncio.sleep(0.1)  # wait-ok: the poll interval of a condition wait


@dataclass
class Replies:
    """Every reply that reached one queue, by correlation id."""

    queue: str
    # Who reads this queue, in the token ledger (tests.ledger): the queue's name unless a test says otherwise.
    caller: str = ""
    per_request: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    tokens: dict[str, set[str]] = field(default_factory=dict)
    max_attempts: int = 0

    @property
    def answered(self) -> int:
        """Requests with at least one reply."""
        return len(self.per_request)

    @property
    def duplicates(self) -> int:
        """Replies beyond the first, over all requests."""
        return sum(n - 1 for n in self.per_request.values())

    def tokens_per_request(self) -> set[int]:
        """How many different token ids the created replies of each request carried."""
        return {len(ids) for ids in self.tokens.values()}

    def on_reply(self, message: AbstractIncomingMessage) -> None:
        """Count one reply."""
        correlation_id = message.correlation_id or ""
        self.per_request[correlation_id] += 1
        headers = message.headers or {}
        outcome = str(headers.get("x-outcome"))
        if outcome == "created":
            body = json.loads(message.body)
            token_id = (body.get("sign_in_token") or body["actor_token"])["id"]
            self.tokens.setdefault(correlation_id, set()).add(token_id)
            book = ledger.current()
            if book is not None:
                book.delivered(token_id, self.caller or self.queue, correlation_id)
        elif outcome == "failed":
            error = json.loads(message.body)["error"]
            outcome = error["code"]
            self.max_attempts = max(self.max_attempts, error["attempts"])
        self.outcomes[outcome] += 1


async def count_replies(channel: AbstractChannel, name: str) -> tuple[Replies, AbstractQueue]:
    """Declare a durable reply queue and count what arrives on it."""
    queue = await channel.declare_queue(name, durable=True)
    replies = Replies(name)

    async def on_message(message: AbstractIncomingMessage) -> None:
        replies.on_reply(message)

    await queue.consume(on_message, no_ack=True)
    return replies, queue


async def publish_requests(
    channel: AbstractChannel,
    queue: str,
    reply_to: str,
    count: int,
    *,
    prefix: str = "r",
    batch: int = 500,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish ``count`` valid requests (one user each, with ``headers``), confirmed, in batches."""
    for start in range(0, count, batch):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"user_id": "user_%s%d"}' % (prefix.encode(), i),
                        correlation_id=f"{prefix}{i}",
                        message_id=f"{prefix}{i}",
                        reply_to=reply_to,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers=headers,
                    ),
                    queue,
                )
                for i in range(start, min(start + batch, count))
            ),
        )
