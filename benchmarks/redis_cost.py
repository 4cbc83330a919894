"""Redis cost benchmark: what the shared rate limit and idempotency store cost per token.

Times, in this process, N rounds of each of: a slot from the in-process
window and from the Redis window (one script call), and a claim, its
answer and its delivery from the in-process store and from the Redis store
(four script calls: claim, remember, delivered, and the release the block's
end makes when nothing was delivered; here three). Reports wall time and this
process's CPU per round, median of --repeats runs, interleaved. Redis is a
private server on loopback, as in the tests.

    uv run python benchmarks/redis_cost.py                 # 5,000 rounds, 5 repeats

Writes benchmarks/results/redis_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

from drain import ROOT
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import Created, SignInToken

from service.clerk.ratelimit import MemoryWindow, Window
from service.clerk.ratelimit._redis import RedisWindow
from service.local.redis_server import LocalRedis
from service.state.dedup import IdempotencyStore, idempotency_key
from service.state.dedup._redis import RedisIdempotencyStore
from service.state.dedup.memory import MemoryIdempotencyStore

RESULTS = ROOT / "benchmarks" / "results"
TOKEN = Created(
    sign_in_token=SignInToken(
        object="sign_in_token",
        id="sit_" + "0" * 24,
        user_id="user_" + "0" * 27,
        token="x" * 600,
        status="pending",
        url="https://accounts.example.test/sign-in?__clerk_ticket=" + "x" * 600,
        created_at=1,
        updated_at=1,
    )
)
REQUEST = b'{"user_id":"user_00000000000000000000000000"}'


async def measure(rounds: int, step: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """Wall and CPU µs per round of ``step``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(rounds):
        await step(i)
    return (time.perf_counter() - wall) / rounds * 1e6, (time.process_time() - cpu) / rounds * 1e6


def taker(window: Window) -> Callable[[int], Awaitable[None]]:
    """One round: take a bulk slot."""

    async def take(_: int) -> None:
        await window.take(Lane.BULK, 0)

    return take


def claimer(store: IdempotencyStore, repeat: int) -> Callable[[int], Awaitable[None]]:
    """One round: claim a new key (new in each repeat too) and answer it."""

    async def claim_and_answer(i: int) -> None:
        key = idempotency_key("caller", f"r{repeat}m{i}", "replies")
        async with store.claim(key) as claim:
            await claim.remember(REQUEST, TOKEN, 600)
            await claim.delivered()

    return claim_and_answer


async def main() -> None:
    """Interleave the contenders, report medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--rounds", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    async with LocalRedis() as server:
        figures: dict[str, list[tuple[float, float]]] = {}
        for repeat in range(args.repeats):
            # A limit the rounds never reach: every call takes a slot.
            memory_window = MemoryWindow(10**7, 10.0)
            redis_window = RedisWindow(server.url, 10**7, 10.0, f"bench:{repeat}")
            memory_store = MemoryIdempotencyStore(600, 2**30)
            redis_store = RedisIdempotencyStore(server.url, 600)

            contenders: dict[str, Callable[[int], Awaitable[None]]] = {
                "rate slot, in process": taker(memory_window),
                "rate slot, Redis": taker(redis_window),
                "claim + answer + delivered, in process": claimer(memory_store, repeat),
                "claim + answer + delivered, Redis": claimer(redis_store, repeat),
            }
            for name, step in contenders.items():
                figures.setdefault(name, []).append(await measure(args.rounds, step))
            await redis_window.close()
            await redis_store.close()
    result = {
        name: {
            "wall_us": round(statistics.median(w for w, _ in runs), 1),
            "cpu_us": round(statistics.median(c for _, c in runs), 1),
        }
        for name, runs in figures.items()
    }
    result["rounds"] = args.rounds  # type: ignore[assignment]
    result["repeats"] = args.repeats  # type: ignore[assignment]
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "redis_cost.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
