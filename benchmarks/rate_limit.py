"""Rate-limit benchmark: a bulk backlog through 1 and 3 replicas against a Clerk that enforces its limit.

The fake Clerk (in this process, so its counts can be read) allows 1,000
calls in any 10 s, as a production key does; the workers are told the same
(CLERK_RATE_LIMIT) and, with more than one replica, share it through a
private Redis. For each replica count it reports the goodput as a fraction
of the limit (the backlog past the first window's burst, over the time it
took), the calls Clerk answered 429, and the busiest 10 s window; it writes
a JSON result and a plot of the calls in the trailing window over time.

    uv run python benchmarks/rate_limit.py                  # 20,000 requests, 1 then 3 replicas
    uv run python benchmarks/rate_limit.py -n 5000 --replicas 3

With AMQP_URL set it uses that broker; otherwise it starts a private node.
Every run is bounded: it gives up after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiohttp
from drain import ROOT, plotted, preload, queue_names, spawn

from service.local.fake_clerk import FakeClerk, FakeClerkStats
from service.local.rabbitmq import LocalBroker, free_port
from service.local.redis_server import LocalRedis

KEY = "sk_live_" + "b" * 32
LIMIT = 1000
WINDOW_SECONDS = 10.0
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "images" / "rate_limit.png"
OUR_AGENT = "sign-in-token-service/"
OTHER_AGENT = "another-program"


async def count_replies(
    amqp_url: str, reply_queue: str, times: list[float], outcomes: Counter[str] | None = None
) -> aio_pika.abc.AbstractConnection:
    """Consume the reply queue, noting when each reply came and its outcome (``created`` or the error code)."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(reply_queue, durable=True)

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        times.append(time.monotonic())
        if outcomes is not None:
            reply = json.loads(message.body)
            outcomes[reply["error"]["code"] if reply["outcome"] == "failed" else "created"] += 1

    await queue.consume(on_reply, no_ack=True)
    return connection


def worker_env(amqp_url: str, clerk_url: str, queues: dict[str, str], **extra: str) -> dict[str, str]:
    """A worker's environment: these queues, the fake Clerk at ``clerk_url``, told its limit."""
    return {
        **os.environ,
        **queues,
        "AMQP_URL": amqp_url,
        "CLERK_API_URL": clerk_url,
        "CLERK_SECRET_KEY": KEY,
        "CLERK_RATE_LIMIT": str(LIMIT),
        "CLERK_RATE_WINDOW_SECONDS": str(WINDOW_SECONDS),
        "LOG_LEVEL": "warning",
        **extra,
    }


class OtherProgram:
    """Another program on the same key: ``share`` of the limit, evenly paced, its own calls counted."""

    def __init__(self, url: str, share: float) -> None:
        """Calls to the fake Clerk at ``url``, ``share`` of LIMIT per window."""
        self.url = url
        self.interval = WINDOW_SECONDS / (share * LIMIT)
        self.refused = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Call until ``stop``, one call every ``interval`` seconds (on a schedule, not after each answer)."""
        headers = {"Authorization": f"Bearer {KEY}", "User-Agent": OTHER_AGENT}
        async with aiohttp.ClientSession(headers=headers) as http:
            next_at = time.monotonic()
            while not stop.is_set():
                async with http.post(f"{self.url}/sign_in_tokens", json={"user_id": "user_other"}) as answer:
                    await answer.read()
                self.refused += answer.status == 429
                next_at += self.interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def run_once(
    amqp_url: str,
    redis_url: str,
    replicas: int,
    count: int,
    timeout: float,  # noqa: ASYNC109
    other_share: float = 0.0,
) -> dict[str, Any]:
    """Preload ``count`` bulk requests, start ``replicas`` workers, wait for every reply.

    With ``other_share``, another program spends that share of the key's limit throughout.
    """
    tag = f"rl{os.getpid()}x{replicas}s{int(other_share * 100)}"
    queues = queue_names(tag)
    clerk = FakeClerk(KEY, rate_limit=LIMIT, rate_window_seconds=WINDOW_SECONDS)
    await clerk.start()
    replies: list[float] = []
    outcomes: Counter[str] = Counter()
    workers = []
    other = OtherProgram(clerk.url, other_share) if other_share else None
    stop_other = asyncio.Event()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(clerk.stop)
        await preload(amqp_url, queues["BULK_QUEUE"], f"{tag}.replies", count)
        connection = await count_replies(amqp_url, f"{tag}.replies", replies, outcomes)
        stack.push_async_callback(connection.close)
        env = worker_env(amqp_url, clerk.url, queues, **({"REDIS_URL": redis_url} if replicas > 1 else {}))
        if other is not None:
            other_task = asyncio.create_task(other.run(stop_other))
            await asyncio.sleep(WINDOW_SECONDS)  # the other program is already running when we start
        workers.extend(spawn(["worker"], {**env, "HTTP_PORT": str(free_port())}) for _ in range(replicas))
        started = time.monotonic()
        while len(replies) < count and time.monotonic() - started < timeout:  # noqa: ASYNC110 - polls another process's work
            await asyncio.sleep(0.2)
        if other is not None:
            stop_other.set()
            await other_task
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.wait, 30)
    accepted = clerk.stats.accepted_at.get(KEY, [])
    if other is not None:
        return _shared_key_figures(clerk.stats, other, outcomes, replicas, count)
    first, last = accepted[0], accepted[-1]
    # The rate past the first window (which a limiter may fill at once, or spread over it).
    steady = sum(1 for t in accepted if t > first + WINDOW_SECONDS)
    steady_rate = steady / max(last - first - WINDOW_SECONDS, 1e-9)
    return {
        "replicas": replicas,
        "requests": count,
        "answered": len(replies),
        "calls_accepted": len(accepted),
        "calls_answered_429": clerk.stats.rate_limited,
        "busiest_window": clerk.stats.busiest_window(KEY, WINDOW_SECONDS),
        "limit": LIMIT,
        "window_seconds": WINDOW_SECONDS,
        "seconds": round(last - first, 1),
        "goodput_fraction": round(steady_rate * WINDOW_SECONDS / LIMIT, 4),
        "trailing_window": _trailing(accepted),
    }


def _shared_key_figures(
    stats: FakeClerkStats, other: OtherProgram, outcomes: Counter[str], replicas: int, count: int
) -> dict[str, Any]:
    """Our calls and 429s, and our goodput against what the other program left, past our first window.

    The fake Clerk tells the two programs apart by their User-Agent.
    """
    ours = next(times for agent, times in stats.accepted_by_agent.items() if agent.startswith(OUR_AGENT))
    theirs = stats.accepted_by_agent[OTHER_AGENT]
    our_429s = sum(n for agent, n in stats.rate_limited_by_agent.items() if agent.startswith(OUR_AGENT))
    begin, end = ours[0] + WINDOW_SECONDS, ours[-1]
    our_steady = sum(1 for t in ours if begin < t <= end)
    left = LIMIT / WINDOW_SECONDS * (end - begin) - sum(1 for t in theirs if begin < t <= end)
    return {
        "replicas": replicas,
        "requests": count,
        "outcomes": dict(outcomes),
        "other_share": round(len(theirs) / (theirs[-1] - theirs[0]) * WINDOW_SECONDS / LIMIT, 3),
        "our_calls": len(ours) + our_429s,
        "our_calls_answered_429": our_429s,
        "our_429_fraction": round(our_429s / (len(ours) + our_429s), 4),
        "other_calls_answered_429": other.refused,
        "goodput_of_what_was_left": round(our_steady / max(1.0, left), 4),
        "seconds": round(end - ours[0], 1),
        "trailing_window": _trailing(ours, origin=ours[0]),
        "other_trailing_window": _trailing(theirs, origin=ours[0]),
    }


def _trailing(accepted: list[float], origin: float | None = None) -> list[tuple[float, int]]:
    """Calls in the trailing window, each second from ``origin`` (the first call)."""
    points, start = [], 0
    origin = accepted[0] if origin is None else origin
    for second in range(int(accepted[-1] - origin) + 2):
        at = origin + second
        while start < len(accepted) and accepted[start] <= at - WINDOW_SECONDS:
            start += 1
        end = start
        while end < len(accepted) and accepted[end] <= at:
            end += 1
        points.append((second, end - start))
    return points


def plot(results: list[dict[str, Any]]) -> None:
    """The trailing-window count over time for each run, against the limit."""
    with plotted(PLOT, "A bulk backlog at Clerk's rate limit") as ax:
        for result in results:
            xs, ys = zip(*result["trailing_window"], strict=True)
            ax.plot(xs, ys, label=f"{result['replicas']} replica(s): {result['calls_answered_429']} answered 429")
        ax.axhline(LIMIT, color="red", linestyle="--", label=f"Clerk's limit ({LIMIT} per {WINDOW_SECONDS:g} s)")
        ax.set_xlabel("seconds since the first call")
        ax.set_ylabel(f"calls in the trailing {WINDOW_SECONDS:g} s")
        ax.set_ylim(0, LIMIT * 1.15)
        ax.legend(loc="lower right")


async def main() -> None:
    """Run each replica count in turn; print, save and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    parser.add_argument("--replicas", type=int, action="append")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    results = []
    async with AsyncExitStack() as stack:
        amqp_url = os.environ.get("AMQP_URL") or (await stack.enter_async_context(LocalBroker())).url
        redis_url = os.environ.get("REDIS_URL") or (await stack.enter_async_context(LocalRedis())).url
        for replicas in args.replicas or [1, 3]:
            result = await run_once(amqp_url, redis_url, replicas, args.requests, args.timeout)
            results.append(result)
            summary = {k: v for k, v in result.items() if k != "trailing_window"}
            print(json.dumps(summary))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rate_limit.json").write_text(json.dumps(results, indent=1))
    plot(results)
    print(f"plot: {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
