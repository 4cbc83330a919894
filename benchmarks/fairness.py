"""Fairness benchmark: interactive requests while a bulk backlog holds the fleet at Clerk's limit.

Three worker processes share the limit (1,000 calls in any 10 s, enforced by
the fake Clerk in this process, which answers after --latency-ms) through a
private Redis. 100,000 bulk requests are queued; once bulk has held the limit
for one window, one interactive request is sent every 200 ms for 60 s, and
each one's time from publish to reply is measured.

The same load then runs through one FIFO queue: the interactive requests
are published behind the backlog on the bulk queue, as a service without
lanes would take them. Those that are not answered within the run are
reported as such, with the wait the backlog implies at the limit.

    uv run python benchmarks/fairness.py                       # 100,000 queued, 60 s, 50 ms Clerk
    uv run python benchmarks/fairness.py -n 20000 --seconds 20

Writes benchmarks/results/fairness.json and docs/images/fairness.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
from drain import ROOT, plotted, preload, queue_names, spawn
from rate_limit import KEY, LIMIT, RESULTS, WINDOW_SECONDS, worker_env

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker, free_port
from service.local.redis_server import LocalRedis

PLOT = ROOT / "docs" / "images" / "fairness.png"
REPLICAS = 3
INTERVAL_SECONDS = 0.2


async def run_once(
    amqp_url: str,
    redis_url: str,
    *,
    backlog: int,
    seconds: float,
    latency_ms: float,
    lanes: bool,
) -> dict[str, Any]:
    """Queue the backlog, start the replicas, then time one interactive request every 200 ms."""
    tag = f"fair{os.getpid()}{'lanes' if lanes else 'fifo'}"
    queues = queue_names(tag)
    clerk = FakeClerk(KEY, rate_limit=LIMIT, rate_window_seconds=WINDOW_SECONDS)
    clerk.latency_seconds = latency_ms / 1000
    await clerk.start()
    latencies: dict[str, float] = {}
    sent_at: dict[str, float] = {}
    workers = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(clerk.stop)
        await preload(amqp_url, queues["BULK_QUEUE"], f"{tag}.bulk-replies", backlog)
        connection = await aio_pika.connect(amqp_url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            key = message.correlation_id or ""
            if key in sent_at:
                latencies[key] = time.monotonic() - sent_at[key]

        await replies.consume(on_reply, no_ack=True)
        env = worker_env(amqp_url, clerk.url, queues, REDIS_URL=redis_url)
        workers.extend(spawn(["worker"], {**env, "HTTP_PORT": str(free_port())}) for _ in range(REPLICAS))
        await asyncio.sleep(WINDOW_SECONDS + 2)  # bulk takes the limit first
        target = queues["REQUEST_QUEUE"] if lanes else queues["BULK_QUEUE"]
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            correlation_id = uuid.uuid4().hex
            sent_at[correlation_id] = time.monotonic()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b'{"user_id": "user_interactive"}', correlation_id=correlation_id, reply_to=replies.name
                ),
                target,
            )
            await asyncio.sleep(INTERVAL_SECONDS)
        grace = time.monotonic() + 10
        while len(latencies) < len(sent_at) and time.monotonic() < grace:  # noqa: ASYNC110 - replies from other processes
            await asyncio.sleep(0.1)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.wait, 30)
        for name in (*queues.values(), f"{tag}.bulk-replies"):
            await channel.queue_delete(name)
    answered = sorted(latencies.values())
    result: dict[str, Any] = {
        "lanes": "interactive and bulk lanes" if lanes else "one FIFO queue",
        "interactive_sent": len(sent_at),
        "interactive_answered": len(answered),
        "clerk_latency_ms": latency_ms,
        "calls_answered_429": clerk.stats.rate_limited,
        "busiest_window": clerk.stats.busiest_window(KEY, WINDOW_SECONDS),
        "latencies_ms": [round(x * 1000, 1) for x in answered],
    }
    if answered:
        result["p50_ms"] = round(statistics.median(answered) * 1000, 1)
        result["p99_ms"] = round(statistics.quantiles(answered, n=100)[98] * 1000, 1) if len(answered) > 1 else None
        result["max_ms"] = round(answered[-1] * 1000, 1)
    else:
        result["implied_wait_s"] = round(backlog / (LIMIT / WINDOW_SECONDS), 0)
    return result


def plot(results: list[dict[str, Any]]) -> None:
    """The interactive latencies with lanes, as a sorted curve, against the target."""
    with plotted(PLOT, f"Interactive requests while {REPLICAS} replicas hold a bulk backlog at Clerk's limit") as ax:
        for result in results:
            values = result["latencies_ms"]
            if values:
                ax.plot(
                    [100 * (i + 1) / len(values) for i in range(len(values))],
                    values,
                    label=f"{result['lanes']}: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms",
                )
            else:
                ax.plot([], [], " ", label=f"{result['lanes']}: 0 of {result['interactive_sent']} answered in the run")
        latency = results[0]["clerk_latency_ms"]
        ax.axhline(
            latency + 100, color="red", linestyle="--", label=f"target: Clerk's latency + 100 ms ({latency + 100:g} ms)"
        )
        ax.set_xlabel("percentile of interactive requests")
        ax.set_ylabel("publish to reply (ms)")
        ax.set_ylim(0, max(latency + 200, *(max(r["latencies_ms"] or [0]) * 1.1 for r in results)))
        ax.legend(loc="upper left")


async def main() -> None:
    """With lanes, then through one FIFO queue; print, save and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--backlog", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    results = []
    async with AsyncExitStack() as stack:
        amqp_url = os.environ.get("AMQP_URL") or (await stack.enter_async_context(LocalBroker())).url
        redis_url = os.environ.get("REDIS_URL") or (await stack.enter_async_context(LocalRedis())).url
        for lanes in (True, False):
            result = await run_once(
                amqp_url, redis_url, backlog=args.backlog, seconds=args.seconds, latency_ms=args.latency_ms, lanes=lanes
            )
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "latencies_ms"}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fairness.json").write_text(json.dumps(results, indent=1))
    plot(results)
    print(f"plot: {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
