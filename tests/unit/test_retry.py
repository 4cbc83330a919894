"""Backoff, Retry-After, attempt limits and deadlines."""

from __future__ import annotations

import itertools
import time

import pytest
from sign_in_tokens_client.contract.errors import (
    DeadlineExceededError,
    RateLimitedError,
    UpstreamUnavailableError,
    UserNotFoundError,
)

from service.clerk.retry import RetryPolicy, probe_delays


class Script:
    """An attempt function failing with the given errors, then returning "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def no_sleep(seconds: float) -> None:
    """Record nothing, wait for nothing."""
    del seconds


async def test_transient_failures_are_retried_until_success() -> None:
    """Two 503s, then success: three attempts."""
    script = Script(UpstreamUnavailableError("a"), UpstreamUnavailableError("b"))
    assert await RetryPolicy(5, 0.01, 1).run(script, deadline=None, sleep=no_sleep) == ("ok", 3)


async def test_final_failures_are_not_retried() -> None:
    """A 404 is raised at once, with one attempt counted."""
    with pytest.raises(UserNotFoundError) as caught:
        await RetryPolicy(5, 0.01, 1).run(Script(UserNotFoundError("x")), deadline=None, sleep=no_sleep)
    assert caught.value.attempts == 1


async def test_attempts_stop_at_the_maximum() -> None:
    """MAX_ATTEMPTS failures: the last error, with the attempt count."""
    script = Script(*(RateLimitedError("r") for _ in range(10)))
    with pytest.raises(RateLimitedError) as caught:
        await RetryPolicy(3, 0.01, 1).run(script, deadline=None, sleep=no_sleep)
    assert (caught.value.attempts, script.calls) == (3, 3)


async def test_waits_are_full_jitter_and_at_least_retry_after() -> None:
    """Waits lie in [0, base * 2**n] and never under Retry-After."""
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    script = Script(
        UpstreamUnavailableError("a"), UpstreamUnavailableError("b", retry_after=0.7), UpstreamUnavailableError("c")
    )
    await RetryPolicy(5, 0.1, 10).run(script, deadline=None, sleep=record)
    assert 0 <= waits[0] <= 0.1
    assert 0.7 <= waits[1] <= 0.8
    assert 0 <= waits[2] <= 0.4


async def test_a_429_spends_no_attempt_and_waits_for_the_limiter_not_a_backoff() -> None:
    """Four 429s and four 503s with five attempts allowed: the ninth call succeeds; a 429 is followed by no sleep."""
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    script = Script(
        *(RateLimitedError("r", retry_after=0.5) for _ in range(4)),
        *(UpstreamUnavailableError("u") for _ in range(4)),
    )
    result, attempts = await RetryPolicy(5, 0.01, 10).run(script, deadline=None, sleep=record)
    assert (result, attempts, script.calls) == ("ok", 9, 9)
    assert waits[:4] == [0.0, 0.0, 0.0, 0.0]


async def test_a_wait_past_the_deadline_ends_in_deadline_exceeded() -> None:
    """A Retry-After beyond the deadline: DeadlineExceededError with the last upstream status."""
    script = Script(UpstreamUnavailableError("down", upstream_status=503, retry_after=5))
    with pytest.raises(DeadlineExceededError) as caught:
        await RetryPolicy(5, 0.01, 10).run(script, deadline=time.time() + 1, sleep=no_sleep)
    assert (caught.value.upstream_status, caught.value.attempts) == (503, 1)


def test_probe_delays_double_from_one_second_to_the_maximum_with_jitter() -> None:
    """Probe waits lie in [c/2, c] with c = 1, 2, 4, ... capped at the maximum."""
    delays = list(itertools.islice(probe_delays(5), 6))
    for delay, ceiling in zip(delays, [1, 2, 4, 5, 5, 5], strict=True):
        assert ceiling / 2 <= delay <= ceiling
