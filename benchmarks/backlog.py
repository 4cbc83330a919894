"""Backlog benchmark: a worker's memory with a million requests queued.

Queues 1,000,000 bulk requests (--backlog), then runs one worker against the
fake Clerk (in this process, enforcing 1,000 calls in any 10 s, the worker
told the same) for --seconds, sampling the worker's RSS every second. The
queue's depth must cost the worker nothing: prefetch bounds what it holds,
and requests waiting for a rate slot are at most that many.

    uv run python benchmarks/backlog.py                         # 1,000,000 queued, 120 s
    uv run python benchmarks/backlog.py --backlog 200000 --seconds 30

Writes benchmarks/results/backlog.json and docs/images/backlog.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import psutil
from drain import ROOT, plotted, preload, queue_names, spawn
from rate_limit import KEY, LIMIT, RESULTS, WINDOW_SECONDS, worker_env

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker, free_port

PLOT = ROOT / "docs" / "images" / "backlog.png"
TARGET_MIB = 150


async def run(amqp_url: str, backlog: int, seconds: float) -> dict[str, Any]:
    """Queue the backlog, run the worker, sample its RSS."""
    tag = f"backlog{os.getpid()}"
    queues = queue_names(tag)
    clerk = FakeClerk(KEY, rate_limit=LIMIT, rate_window_seconds=WINDOW_SECONDS)
    await clerk.start()
    samples: list[tuple[float, float]] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(clerk.stop)
        started = time.monotonic()
        await preload(amqp_url, queues["BULK_QUEUE"], f"{tag}.replies", backlog)
        preload_seconds = time.monotonic() - started
        env = worker_env(amqp_url, clerk.url, queues, HTTP_PORT=str(free_port()))
        worker = spawn(["worker"], env)
        process = psutil.Process(worker.pid)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            samples.append((round(time.monotonic() - started, 1), process.memory_info().rss / 2**20))
            await asyncio.sleep(1.0)
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        left = await channel.declare_queue(queues["BULK_QUEUE"], passive=True)
        depth = int(left.declaration_result.message_count or 0)
        for name in (*queues.values(), f"{tag}.replies"):
            await channel.queue_delete(name)
        await connection.close()
    rss = [mib for _, mib in samples]
    settled = rss[len(rss) // 4 :]
    return {
        "backlog": backlog,
        "preload_seconds": round(preload_seconds, 1),
        "seconds": seconds,
        "created": clerk.stats.created,
        "depth_at_end": depth,
        "rss_mib_peak": round(max(rss), 1),
        "rss_mib_first_quarter_end": round(settled[0], 1),
        "rss_mib_last": round(rss[-1], 1),
        "rss_mib_growth_after_first_quarter": round(rss[-1] - settled[0], 1),
        "samples": samples,
    }


def plot(result: dict[str, Any]) -> None:
    """RSS over time against the target."""
    with plotted(PLOT, "A worker's memory under a deep backlog, draining at Clerk's limit") as ax:
        xs, ys = zip(*result["samples"], strict=True)
        ax.plot(xs, ys, label=f"worker RSS, {result['backlog']:,} requests queued")
        ax.axhline(TARGET_MIB, color="red", linestyle="--", label=f"target: under {TARGET_MIB} MB")
        ax.set_xlabel("seconds since the worker started")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(0, TARGET_MIB * 1.2)
        ax.legend(loc="lower right")


async def main() -> None:
    """Run once; print, save and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    async with AsyncExitStack() as stack:
        amqp_url = os.environ.get("AMQP_URL") or (await stack.enter_async_context(LocalBroker())).url
        result = await run(amqp_url, args.backlog, args.seconds)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backlog.json").write_text(json.dumps(result, indent=1))
    plot(result)
    print(f"plot: {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
