"""Retries of transient upstream failures: full-jitter backoff, Retry-After, deadlines.

The mechanism is in-process: the request stays unacknowledged while it
waits, its upstream slot is released during the wait, and other requests go
on (see docs/design.md for why, and for the bound under the broker's
consumer timeout). tenacity drives the loop; this module says when to stop
and how long to wait.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from sign_in_tokens_client.contract.errors import DeadlineExceededError, RateLimitedError, RequestError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
# Told of each retry before its wait: the attempt that failed, its error, the wait in seconds.
OnRetry = Callable[[int, BaseException | None, float], None]


def probe_delays(max_seconds: float) -> Iterator[float]:
    """Waits between probes of a paused worker: jittered, from about 1 s doubling to ``max_seconds``."""
    ceiling = 1.0
    while True:
        yield random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto
        ceiling = min(ceiling * 2, max_seconds)


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed attempt may be tried again."""
    return isinstance(exc, RequestError) and exc.retryable


class _Stop:
    """Stop at the attempt limit, past a Retry-After we will not hold for, or at the deadline.

    A 429 spends no attempt: the rate limiter holds the next call until Clerk's Retry-After
    (interactive first, every replica together). Clerk answering 429 to MAX_ATTEMPTS calls of one
    request ends it as ``rate_limited``, so a key another program exhausts cannot hold it forever.
    """

    def __init__(self, max_attempts: int, max_delay: float, deadline: float | None) -> None:
        self.max_attempts = max_attempts
        self.max_delay = max_delay
        self.deadline = deadline
        self.by_deadline = False
        self.limited = 0

    def __call__(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RateLimitedError):
            self.limited += 1
            # The wait is the limiter's, which also ends at the deadline.
            return self.limited >= self.max_attempts or (error.retry_after or 0.0) > self.max_delay
        if state.attempt_number - self.limited >= self.max_attempts or state.upcoming_sleep > self.max_delay:
            return True
        self.by_deadline = self.deadline is not None and time.time() + state.upcoming_sleep >= self.deadline
        return self.by_deadline


class RetryPolicy:
    """How often and how long to retry; one instance, shared by all requests."""

    def __init__(self, max_attempts: int, base_seconds: float, max_delay_seconds: float) -> None:
        """Full jitter: each wait is uniform in [0, min(max, base * 2**n)]."""
        self.max_attempts = max_attempts
        self.max_delay = max_delay_seconds
        self._base = base_seconds
        self._jitter = wait_random_exponential(multiplier=base_seconds, max=max_delay_seconds)

    def wait_seconds(self, state: RetryCallState) -> float:
        """The jittered backoff, never shorter than Clerk's Retry-After; none after a 429 (the limiter holds)."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RateLimitedError):
            return 0.0
        delay = self._jitter(state)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            # A small spread above Retry-After keeps replicas from returning in lockstep.
            delay = max(delay, retry_after + random.uniform(0, self._base))  # noqa: S311 - jitter, not crypto
        return delay

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        deadline: float | None,
        sleep: Sleep,
        on_retry: OnRetry | None = None,
    ) -> tuple[T, int]:
        """Run ``attempt`` until it succeeds or may not be retried.

        Returns the result and the number of attempts. A final failure is
        raised with ``attempts`` set; one cut short by the deadline becomes
        DeadlineExceededError carrying the last upstream answer.
        """
        # The first attempt runs without tenacity: most succeed, and the loop costs more than the call.
        try:
            return await attempt(), 1
        except RequestError as exc:
            if not is_retryable(exc):
                raise _final(exc, attempts=1, by_deadline=False) from None
            first: RequestError | None = exc

        async def again() -> T:
            nonlocal first
            if first is not None:  # tenacity's first attempt is the one that just failed
                error, first = first, None
                raise error
            return await attempt()

        stop = _Stop(self.max_attempts, self.max_delay, deadline)

        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None:
                error = state.outcome.exception() if state.outcome else None
                on_retry(state.attempt_number, error, state.upcoming_sleep)

        retrying = AsyncRetrying(
            stop=stop,
            wait=self.wait_seconds,
            retry=retry_if_exception(is_retryable),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt_state in retrying:
                with attempt_state:
                    result = await again()
        except RequestError as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise _final(exc, attempts=attempts, by_deadline=stop.by_deadline) from None
        return result, retrying.statistics.get("attempt_number", 1)


def _final(exc: RequestError, *, attempts: int, by_deadline: bool) -> RequestError:
    if by_deadline and exc.retryable:
        exc = DeadlineExceededError(
            f"x-deadline would pass before the next attempt; last answer: {exc.message}",
            upstream_status=exc.upstream_status,
            upstream_code=exc.upstream_code,
            clerk_trace_id=exc.clerk_trace_id,
        )
    exc.attempts = attempts
    return exc
