"""Shared-key benchmark: a bulk backlog while another program spends 30 % of the key's limit.

The fake Clerk (in this process) allows 1,000 calls in any 10 s for the key;
another program (also in this process) calls it steadily at --other-share of
that; the workers are told the whole limit (CLERK_RATE_LIMIT=1000), as an
operator who forgot the other program would, so they find their share by
the 429s they meet. Reports our calls answered 429, our requests answered
``rate_limited`` (none expected: a 429 spends no attempt), and our goodput
against what the other program left, for 1 and 3 replicas.

    uv run python benchmarks/shared_key.py                      # 20,000 requests, 1 then 3 replicas
    uv run python benchmarks/shared_key.py -n 5000 --replicas 3

Writes benchmarks/results/shared_key.json and docs/images/shared_key.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import AsyncExitStack
from typing import Any

from drain import ROOT, plotted
from rate_limit import LIMIT, RESULTS, WINDOW_SECONDS, run_once

from service.local.rabbitmq import LocalBroker
from service.local.redis_server import LocalRedis

PLOT = ROOT / "docs" / "images" / "shared_key.png"


def plot(results: list[dict[str, Any]], share: float) -> None:
    """Our trailing-window calls and the other program's, against the limit and what was left."""
    with plotted(PLOT, f"A bulk backlog on a key another program uses at {share:.0%}") as ax:
        for result in results:
            xs, ys = zip(*result["trailing_window"], strict=True)
            ax.plot(
                xs, ys, label=f"ours, {result['replicas']} replica(s): {result['our_calls_answered_429']} answered 429"
            )
        xs, ys = zip(*results[0]["other_trailing_window"], strict=True)
        ax.plot(xs, ys, color="grey", label="the other program")
        ax.axhline(LIMIT, color="red", linestyle="--", label=f"Clerk's limit ({LIMIT} per {WINDOW_SECONDS:g} s)")
        ax.axhline(LIMIT * (1 - share), color="orange", linestyle=":", label="what the other program leaves")
        ax.set_xlabel("seconds since our first call")
        ax.set_ylabel(f"calls in the trailing {WINDOW_SECONDS:g} s")
        ax.set_ylim(0, LIMIT * 1.15)
        ax.legend(loc="lower right", fontsize="small")


async def main() -> None:
    """Run each replica count in turn; print, save and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    parser.add_argument("--replicas", type=int, action="append")
    parser.add_argument("--other-share", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    results = []
    async with AsyncExitStack() as stack:
        amqp_url = os.environ.get("AMQP_URL") or (await stack.enter_async_context(LocalBroker())).url
        redis_url = os.environ.get("REDIS_URL") or (await stack.enter_async_context(LocalRedis())).url
        for replicas in args.replicas or [1, 3]:
            result = await run_once(amqp_url, redis_url, replicas, args.requests, args.timeout, args.other_share)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if "trailing" not in k}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shared_key.json").write_text(json.dumps(results, indent=1))
    plot(results, args.other_share)
    print(f"plot: {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
