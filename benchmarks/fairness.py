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

With ``--instances``, across two Clerk instances (CLERK_INSTANCES_FILE), each its own key and
limit (1,000 calls in 10 s): the backlog is staging's bulk work; prod's requests, one interactive
and one bulk every 200 ms for --seconds, are timed from publish to reply. Twice: with staging
working (its backlog at its limit), and with staging's key rejected (its backlog moved to its
hold queue meanwhile). Writes benchmarks/results/fairness_instances.json and
docs/images/fairness-instances.png.

    uv run python benchmarks/fairness.py --instances -n 20000 --seconds 30
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
INSTANCES_PLOT = ROOT / "docs" / "images" / "fairness-instances.png"
STAGING_KEY = "sk_live_" + "s" * 32
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


def _summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    found: dict[str, Any] = {"answered": len(ordered), "latencies_ms": [round(x * 1000, 1) for x in ordered]}
    if len(ordered) > 1:
        found["p50_ms"] = round(statistics.median(ordered) * 1000, 1)
        found["p99_ms"] = round(statistics.quantiles(ordered, n=100)[98] * 1000, 1)
        found["max_ms"] = round(ordered[-1] * 1000, 1)
    return found


async def run_instances(
    amqp_url: str, redis_url: str, *, backlog: int, seconds: float, latency_ms: float, staging_rejected: bool
) -> dict[str, Any]:
    """Staging's bulk backlog, and prod's interactive and bulk requests timed; staging's key rejected or not."""
    tag = f"fairi{os.getpid()}{'rejected' if staging_rejected else 'working'}"
    queues = {**queue_names(tag), "HOLD_QUEUE_PREFIX": f"{tag}.hold"}
    clerk = FakeClerk(KEY, rate_window_seconds=WINDOW_SECONDS)
    clerk.rate_limits = {KEY: LIMIT, STAGING_KEY: LIMIT}
    if not staging_rejected:
        clerk.accepted_keys.add(STAGING_KEY)
    clerk.latency_seconds = latency_ms / 1000
    await clerk.start()
    instances = RESULTS / f"{tag}.toml"
    RESULTS.mkdir(parents=True, exist_ok=True)
    instances.write_text(
        f'[instances.prod]\nsecret_key = "{KEY}"\napi_url = "{clerk.url}"\n'
        f'[instances.staging]\nsecret_key = "{STAGING_KEY}"\napi_url = "{clerk.url}"\n'
    )
    latencies: dict[str, dict[str, float]] = {"interactive": {}, "bulk": {}}
    sent_at: dict[str, tuple[str, float]] = {}
    workers = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(clerk.stop)
        stack.callback(instances.unlink)
        await preload(
            amqp_url,
            queues["BULK_QUEUE"],
            f"{tag}.bulk-replies",
            backlog,
            headers={"x-clerk-instance": "staging"},
        )
        connection = await aio_pika.connect(amqp_url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            lane, at = sent_at.get(message.correlation_id or "", ("", 0.0))
            if lane:
                latencies[lane][message.correlation_id or ""] = time.monotonic() - at

        await replies.consume(on_reply, no_ack=True)
        env = worker_env(amqp_url, clerk.url, queues, REDIS_URL=redis_url, CLERK_INSTANCES_FILE=str(instances))
        workers.extend(spawn(["worker"], {**env, "HTTP_PORT": str(free_port())}) for _ in range(REPLICAS))
        await asyncio.sleep(WINDOW_SECONDS + 2)  # staging's backlog takes its limit (or meets its 401) first
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            for lane, queue in (("interactive", queues["REQUEST_QUEUE"]), ("bulk", queues["BULK_QUEUE"])):
                correlation_id = uuid.uuid4().hex
                sent_at[correlation_id] = (lane, time.monotonic())
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"user_id": "user_prod"}',
                        correlation_id=correlation_id,
                        reply_to=replies.name,
                        headers={"x-clerk-instance": "prod"},
                    ),
                    queue,
                )
            await asyncio.sleep(INTERVAL_SECONDS)
        grace = time.monotonic() + 10
        while sum(map(len, latencies.values())) < len(sent_at) and time.monotonic() < grace:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        staging_made = len(clerk.stats.accepted_at.get(STAGING_KEY, []))
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.wait, 30)
        holds = [f"{tag}.hold.{name}{kind}" for name in ("prod", "staging") for kind in ("", ".bulk", ".revocations")]
        held = (await channel.declare_queue(f"{tag}.hold.staging.bulk", passive=True)).declaration_result.message_count
        for name in (*queues.values(), f"{tag}.bulk-replies", *holds):
            await channel.queue_delete(name)
    return {
        "staging": "key rejected" if staging_rejected else "working, its backlog at its limit",
        "prod_sent_each_lane": len(sent_at) // 2,
        "clerk_latency_ms": latency_ms,
        "calls_answered_429": clerk.stats.rate_limited,
        "staging_calls_accepted": staging_made,
        "staging_requests_in_hold_queue": held,
        "busiest_window_staging": clerk.stats.busiest_window(STAGING_KEY, WINDOW_SECONDS),
        "busiest_window_prod": clerk.stats.busiest_window(KEY, WINDOW_SECONDS),
        **{f"prod_{lane}": _summary(list(found.values())) for lane, found in latencies.items()},
    }


def plot_instances(results: list[dict[str, Any]]) -> None:
    """Prod's latencies, per lane, under each of staging's states."""
    title = f"Prod's requests while staging has a bulk backlog ({REPLICAS} replicas, two Clerk instances)"
    with plotted(INSTANCES_PLOT, title) as ax:
        for result in results:
            for lane in ("interactive", "bulk"):
                found = result[f"prod_{lane}"]
                values = found["latencies_ms"]
                ax.plot(
                    [100 * (i + 1) / len(values) for i in range(len(values))],
                    values,
                    label=f"prod {lane}, staging {result['staging'].split(',')[0]}: "
                    f"p50 {found.get('p50_ms')} ms, p99 {found.get('p99_ms')} ms",
                )
        ax.set_xlabel("percentile of prod's requests")
        ax.set_ylabel("publish to reply (ms)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize="small")


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
    parser.add_argument("--instances", action="store_true", help="Across two Clerk instances (see above).")
    args = parser.parse_args()
    results = []
    async with AsyncExitStack() as stack:
        amqp_url = os.environ.get("AMQP_URL") or (await stack.enter_async_context(LocalBroker())).url
        redis_url = os.environ.get("REDIS_URL") or (await stack.enter_async_context(LocalRedis())).url
        if args.instances:
            for rejected in (False, True):
                result = await run_instances(
                    amqp_url,
                    redis_url,
                    backlog=args.backlog,
                    seconds=args.seconds,
                    latency_ms=args.latency_ms,
                    staging_rejected=rejected,
                )
                results.append(result)
                print(json.dumps(_brief(result)))
            (RESULTS / "fairness_instances.json").write_text(json.dumps(results, indent=1))
            plot_instances(results)
            print(f"plot: {INSTANCES_PLOT.relative_to(ROOT)}")
            return
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


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """A result without its lists of latencies."""
    return {
        key: {k: v for k, v in value.items() if k != "latencies_ms"} if isinstance(value, dict) else value
        for key, value in result.items()
    }


if __name__ == "__main__":
    asyncio.run(main())
