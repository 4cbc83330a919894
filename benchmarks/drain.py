"""Drain benchmark: how fast one worker answers a preloaded backlog.

Preloads N requests (default 20,000) into a queue, then starts one worker
process against the fake Clerk (its own process, so the worker is measured
alone) and times it until every reply is in the reply queue. Reports
tokens/s, the worker's CPU seconds per token and its peak RSS.

    uv run python benchmarks/drain.py                      # 20,000 requests, 0 ms and 50 ms Clerk latency
    uv run python benchmarks/drain.py -n 5000 --latency-ms 0 --latency-ms 100

With AMQP_URL set it uses that broker; otherwise it starts a private node.
Every run is bounded: it gives up after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import aiohttp
import psutil

from service.local.rabbitmq import LocalBroker, free_port

if TYPE_CHECKING:
    from matplotlib.axes import Axes

KEY = "sk_test_benchmark"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """One drain run's figures."""

    requests: int
    latency_ms: float
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float

    def row(self) -> str:
        """A Markdown table row."""
        return (
            f"| {self.requests:,} | {self.latency_ms:g} | {self.seconds:.2f} | {self.requests / self.seconds:,.0f} "
            f"| {self.cpu_seconds / self.requests * 1e6:,.0f} | {self.peak_rss_mib:.0f} |"
        )


HEADER = (
    "| requests | Clerk latency (ms) | drain (s) | tokens/s | worker CPU µs/token | worker peak RSS (MiB) |\n"
    "|---|---|---|---|---|---|"
)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m service ARGS`` quietly."""
    return subprocess.Popen(  # noqa: S603 - our own module
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_http(url: str, timeout: float) -> None:  # noqa: ASYNC109
    """Wait until ``url`` answers 200 (any method-allowed answer for the fake)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if response.status in {200, 405}:
                        return
            await asyncio.sleep(0.05)
    msg = f"{url} did not come up"
    raise RuntimeError(msg)


def queue_names(tag: str) -> dict[str, str]:
    """The worker's queue variables, named after a run's tag."""
    return {
        "REQUEST_QUEUE": f"{tag}.create",
        "BULK_QUEUE": f"{tag}.bulk",
        "IMPERSONATION_QUEUE": f"{tag}.impersonate",
        "RESULTS_QUEUE": f"{tag}.results",
        "DEAD_LETTER_QUEUE": f"{tag}.dead",
    }


@contextlib.contextmanager
def plotted(path: Path, title: str) -> Iterator[Axes]:
    """Axes for one plot, saved to ``path`` (matplotlib is imported only when a plot is drawn)."""
    import matplotlib as mpl  # noqa: PLC0415 - only the plots need it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 4))
    yield ax
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def sign_in_body(n: int) -> bytes:
    """The ``n``-th request for a sign-in token."""
    return b'{"user_id": "user_%d"}' % n


def actor_body(n: int) -> bytes:
    """The ``n``-th request for an actor token: an agent logs in as a user."""
    return b'{"user_id": "user_%d", "actor": {"sub": "user_agent_1"}}' % n


async def preload(
    amqp_url: str,
    queue: str,
    reply_queue: str,
    count: int,
    arguments: dict[str, Any] | None = None,
    *,
    body: Callable[[int], bytes] = sign_in_body,
    user_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish ``count`` requests, confirmed in batches, to ``queue`` (quorum unless ``arguments`` say more).

    ``body``: the n-th request's body; ``user_id``: the publisher named on each (the connection's user);
    ``headers``: on each (``x-clerk-instance``, say).
    """
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True, arguments=arguments or {"x-queue-type": "quorum"})
    await channel.declare_queue(reply_queue, durable=True)
    batch = 500
    for start in range(0, count, batch):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        body(i), correlation_id=str(i), reply_to=reply_queue, user_id=user_id, headers=headers
                    ),
                    queue,
                )
                for i in range(start, min(start + batch, count))
            ),
        )
    await connection.close()


async def replies_in(amqp_url: str, reply_queue: str) -> int:
    """Messages waiting in the reply queue."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(reply_queue, passive=True)
    count = int(queue.declaration_result.message_count or 0)
    await connection.close()
    return count


async def drain_once(amqp_url: str, count: int, latency_ms: float, timeout: float, log_level: str) -> Result:  # noqa: ASYNC109
    """Preload, start a worker, time the drain, stop everything."""
    tag = f"bench{os.getpid()}x{int(latency_ms)}"
    queues = queue_names(tag)
    reply_queue = f"{tag}.replies"
    clerk_port, http_port = free_port(), free_port()
    env = {**os.environ, "CLERK_SECRET_KEY": KEY}
    clerk = spawn(["fake-clerk", "--port", str(clerk_port), "--latency-ms", str(latency_ms)], env)
    worker = None
    try:
        await wait_http(f"http://127.0.0.1:{clerk_port}/v1/sign_in_tokens", 30)
        await preload(amqp_url, queues["REQUEST_QUEUE"], reply_queue, count)
        worker_env = {
            **env,
            **queues,
            "AMQP_URL": amqp_url,
            "CLERK_API_URL": f"http://127.0.0.1:{clerk_port}/v1",
            "HTTP_PORT": str(http_port),
            "LOG_LEVEL": log_level,
            "LOG_FORMAT": "json",
            # The drain measures the worker's CPU, not Clerk's limit.
            "CLERK_RATE_LIMIT": "1000000",
        }
        worker = spawn(["worker"], worker_env)
        process = psutil.Process(worker.pid)
        started = time.monotonic()
        await wait_http(f"http://127.0.0.1:{http_port}/healthz", 30)
        while (done := await replies_in(amqp_url, reply_queue)) < count:
            if time.monotonic() - started > timeout:
                msg = f"only {done} of {count} replies after {timeout} s"
                raise RuntimeError(msg)
            await asyncio.sleep(0.1)
        seconds = time.monotonic() - started
        cpu = process.cpu_times()
        return Result(count, latency_ms, seconds, cpu.user + cpu.system, peak_rss_mib(worker.pid))
    finally:
        for process_ in (worker, clerk):
            if process_ is not None:
                process_.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process_.wait(30)
                process_.kill()
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        for name in (*queues.values(), reply_queue):
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        await connection.close()


async def main() -> None:
    """Run the drains the command line asks for and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, action="append", help="fake Clerk latency; repeatable")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds per run")
    parser.add_argument("--log-level", default="info", help="the worker's LOG_LEVEL")
    args = parser.parse_args()
    latencies = args.latency_ms or [0.0, 50.0]
    async with contextlib.AsyncExitStack() as stack:
        amqp_url = os.environ.get("AMQP_URL")
        if not amqp_url:
            amqp_url = (await stack.enter_async_context(LocalBroker())).url
        results = [await drain_once(amqp_url, args.requests, ms, args.timeout, args.log_level) for ms in latencies]
    print(f"worker: default settings (PREFETCH 100, UPSTREAM_CONCURRENCY 32), LOG_LEVEL={args.log_level}")
    print(HEADER)
    for result in results:
        print(result.row())


if __name__ == "__main__":
    asyncio.run(main())
