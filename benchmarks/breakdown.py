"""Where a token's CPU goes: a py-spy profile (raw, collapsed stacks) split by owner and by step.

Each sample is charged to the owner of its innermost Python frame (time in
C extensions, msgspec or uvloop, counts for the Python frame that called
them): our code, aio-pika/aiormq/pamqp, aiohttp, structlog, prometheus_client,
redis-py, asyncio, the rest. Separately, each sample is charged to the step
of a message's life it belongs to: the outermost of our functions in its
stack that names a step.

    uv run python benchmarks/breakdown.py benchmarks/results/profile/service-0ms.txt --cpu-us 1100

``--cpu-us`` (the worker's CPU per token, from throughput.py) turns the
shares into microseconds per token.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# The innermost frame's file, matched in order: the first pattern that matches names the owner.
OWNERS = (
    ("ours (service/)", re.compile(r"(^|/)service/")),
    ("aio-pika, aiormq, pamqp", re.compile(r"(^|/)(aio_pika|aiormq|pamqp)/")),
    ("aiohttp, yarl, multidict", re.compile(r"(^|/)(aiohttp|yarl|multidict|aiohappyeyeballs)/")),
    ("structlog", re.compile(r"(^|/)structlog/")),
    ("prometheus_client", re.compile(r"(^|/)prometheus_client/")),
    ("redis-py", re.compile(r"(^|/)redis/")),
    ("tenacity", re.compile(r"(^|/)tenacity/")),
    ("asyncio", re.compile(r"(^|/)asyncio/")),
)

# Our functions (as py-spy names them) that name a step of a message's life; a sample belongs to the
# innermost one in its stack. What runs in a step, the libraries' code included, counts for it.
STEPS = {
    "LaneConsumers._callback.<locals>.on_message": "dispatch: our consumer callback",
    "Worker._on_message": "dispatch: in-flight gauge, error handling",
    "Pipeline.handle": "handle: log context, reply assembly",
    "Pipeline._handle": "handle: log context, reply assembly",
    "Envelope.of": "read the envelope",
    "decode_request": "decode the request",
    "encode_clerk_body": "encode Clerk's body",
    "Policy.admit": "policy",
    "Issuing.answer": "handle: log context, reply assembly",
    "Issuing._claimed": "handle: log context, reply assembly",
    "MemoryIdempotencyStore.claim": "idempotency claim",
    "RedisIdempotencyStore.claim": "idempotency claim",
    "MemoryIdempotencyStore.remember": "idempotency answer",
    "RedisIdempotencyStore.remember": "idempotency answer",
    "RetryPolicy.run": "retry wrapper",
    "ClerkRateLimiter.acquire": "rate slot",
    "LaneGate.turn": "lane gate",
    "ClerkClient._post": "Clerk call (aiohttp)",
    "ClerkClient.create": "Clerk call (aiohttp)",
    "Delivery.deliver": "reply: encode, log",
    "ReplyPublisher.publish": "reply: publish, confirm",
    "Settle.ack": "ack",
}
_FRAME = re.compile(r"^(?P<function>[^ ]+) \((?P<file>[^:]+)(:\d+)?\)$")


def samples(path: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """(stack outermost first as (function, file), count) for each line of a raw profile."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match:
                frames.append((match["function"], match["file"]))
        if frames and count.isdigit():
            yield frames, int(count)


def owner(file: str) -> str:
    """Who owns the code in ``file``."""
    return next((name for name, pattern in OWNERS if pattern.search(file)), "other (event loop, stdlib)")


def step(frames: list[tuple[str, str]]) -> str:
    """The step of a message's life a stack belongs to: its innermost of ours that names one."""
    for function, file in reversed(frames):
        if function in STEPS and OWNERS[0][1].search(file):
            return STEPS[function]
    return "outside our code (libraries' dispatch, the loop)"


def breakdown(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """Samples per owner, per step, and in all."""
    owners: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    total = 0
    for frames, count in samples(path):
        owners[owner(frames[-1][1])] += count
        steps[step(frames)] += count
        total += count
    return owners, steps, total


def rows(counts: Counter[str], total: int, cpu_us: float | None) -> Iterator[str]:
    """Markdown rows: share, and µs per token when the CPU per token is known."""
    for name, count in counts.most_common():
        share = count / total
        yield f"| {name} | {share:.1%} | {'' if cpu_us is None else f'{share * cpu_us:,.0f}'} |"


def main() -> None:
    """Print both tables for each profile given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--cpu-us", type=float, default=None, help="the worker's CPU µs per token")
    args = parser.parse_args()
    for path in args.profiles:
        owners, steps, total = breakdown(path)
        print(f"\n{path.name}: {total:,} samples\n")
        print("| owner of the running code | share | µs/token |\n|---|---|---|")
        print("\n".join(rows(owners, total, args.cpu_us)))
        print("\n| step | share | µs/token |\n|---|---|---|")
        print("\n".join(rows(steps, total, args.cpu_us)))


if __name__ == "__main__":
    main()
