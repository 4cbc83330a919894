"""The rate limiter: never over the limit in any sliding window, interactive lane first, deadlines kept."""

from __future__ import annotations

import asyncio
import time

import pytest
from sign_in_tokens_client.contract.errors import DeadlineExceededError
from sign_in_tokens_client.contract.lanes import Lane

from service.clerk.ratelimit import ClerkRateLimiter, MemoryWindow, burst, climbed, reserve
from service.local.fake_clerk import FakeClerkStats


async def test_no_sliding_window_ever_holds_more_than_the_limit() -> None:
    """60 callers at once through 10 per 0.3 s: every window of 0.3 s holds at most 10 grants."""
    limiter = ClerkRateLimiter(10, 0.3)
    granted: list[float] = []

    async def call(i: int) -> None:
        await limiter.acquire(Lane.BULK if i % 2 else Lane.INTERACTIVE)
        granted.append(time.monotonic())

    await asyncio.gather(*(call(i) for i in range(60)))
    stats = FakeClerkStats(accepted_at={"k": sorted(granted)})
    assert stats.busiest_window("k", 0.3) == 10
    assert granted[-1] - granted[0] >= 5 * 0.3  # 60 grants need at least five more windows
    await limiter.close()


async def test_a_waiting_interactive_request_gets_the_next_slot_before_waiting_bulk() -> None:
    """The window is full and bulk requests wait: an interactive request that arrives later goes first."""
    limiter = ClerkRateLimiter(2, 0.3)
    order: list[str] = []
    for _ in range(2):
        await limiter.acquire(Lane.BULK)

    async def call(name: str, lane: Lane) -> None:
        await limiter.acquire(lane)
        order.append(name)

    bulk = [asyncio.create_task(call(f"bulk{i}", Lane.BULK)) for i in range(3)]
    await asyncio.sleep(0)  # wait-ok: let the bulk requests queue first
    interactive = asyncio.create_task(call("interactive", Lane.INTERACTIVE))
    await asyncio.gather(*bulk, interactive)
    assert order[0] == "interactive"
    await limiter.close()


async def test_a_deadline_that_passes_while_waiting_is_deadline_exceeded() -> None:
    """A request that cannot get a slot before its x-deadline is refused, and no slot is spent on it."""
    limiter = ClerkRateLimiter(1, 5.0)
    await limiter.acquire(Lane.INTERACTIVE)
    with pytest.raises(DeadlineExceededError):
        await limiter.acquire(Lane.INTERACTIVE, deadline=time.time() + 0.1)
    assert limiter.waiting(Lane.INTERACTIVE) == 0
    await limiter.close()


async def test_a_429_holds_every_slot_until_retry_after() -> None:
    """After hold_until, no slot is given before that time, though the window has room."""
    limiter = ClerkRateLimiter(100, 10.0)
    until = time.time() + 0.3
    await limiter.on_429(0.3)
    await limiter.acquire(Lane.INTERACTIVE)
    assert time.time() >= until
    await limiter.close()


async def test_bulk_leaves_the_reserve_to_the_interactive_lane() -> None:
    """A window of 400 holding all but its reserve (two slots): bulk is refused, interactive gets both."""
    window = MemoryWindow(400, 10.0)
    assert reserve(400) == 2
    for _ in range(398):
        assert await window.take(Lane.INTERACTIVE, 0) == 0.0
    assert await window.take(Lane.BULK, 0) > 0
    assert [await window.take(Lane.INTERACTIVE, 0) for _ in range(2)] == [0.0, 0.0]
    assert await window.take(Lane.INTERACTIVE, 0) > 0


async def test_bulk_is_spread_over_the_window_not_taken_in_one_burst() -> None:
    """100 bulk slots in 1 s: paced at the window's rate, not taken at once."""
    limiter = ClerkRateLimiter(100, 1.0)
    granted: list[float] = []

    async def call() -> None:
        await limiter.acquire(Lane.BULK)
        granted.append(time.monotonic())

    await asyncio.gather(*(call() for _ in range(60)))
    # At the window's rate (100 in 1.1 s with the margin), a tenth of a second holds ten at most.
    assert burst(100) == 1
    assert FakeClerkStats(accepted_at={"k": granted}).busiest_window("k", 0.1) <= 10
    await limiter.close()


async def test_a_429_cuts_the_rate_once_per_hold_then_it_climbs_back() -> None:
    """After a 429 the window gives 90 % of the limit; a second 429 in the same hold cuts nothing more."""
    window = MemoryWindow(100, 1.0)
    assert await window.on_429(0.01) == 90.0
    assert await window.on_429(0.01) is None
    assert 89.0 < window._effective(time.monotonic()) <= 90.5
    assert climbed(100, 90.0, 1.0, 1.0) == 92.0
    assert climbed(100, 90.0, 6.0, 1.0) == 100.0


async def test_an_interactive_request_does_not_wait_out_the_sleep_bulk_was_given() -> None:
    """Bulk waits half a second for its next slice; an interactive request arriving then is served at once."""
    limiter = ClerkRateLimiter(10, 5.0)
    await limiter.acquire(Lane.BULK)
    bulk = asyncio.create_task(limiter.acquire(Lane.BULK))  # its slice is full: the dispatcher sleeps
    await asyncio.sleep(0.01)  # wait-ok: let the dispatcher reach its sleep
    started = time.monotonic()
    await limiter.acquire(Lane.INTERACTIVE)
    assert time.monotonic() - started < 0.1
    assert not bulk.done()
    bulk.cancel()
    await limiter.close()
