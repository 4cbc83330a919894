"""Each row of the contract's error table, and whether Clerk was called."""

from __future__ import annotations

import time
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import ErrorDetail, Failed

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import free_port
from service.worker.lifecycle import Worker
from tests.conftest import WorkerFactory, get_message


async def error_of(client: SignInTokenClient, body: bytes, **send: object) -> ErrorDetail:
    """Send ``body`` and return the error of its (failed) reply."""
    reply = (await (await client.send(body, **send))).decode()  # type: ignore[arg-type]
    assert isinstance(reply, Failed), reply
    return reply.error


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"user_id": "user_x", "expires_in_second": 60}', "expires_in_second"),
        (b'{"user_id": 12}', "$.user_id"),
        (b'{"user_id": "user_x", "expires_in_seconds": true}', "$.expires_in_seconds"),
        (b'{"user_id": "user_x", "expires_in_seconds": 1.5}', "$.expires_in_seconds"),
        (b'{"user_id": "user_x", "expires_in_seconds": 0}', "$.expires_in_seconds"),
        (b'{"user_id": "user_x", "expires_in_seconds": 2592001}', "$.expires_in_seconds"),
        (b'{"userId": "user_x", "expiresInSeconds": "60"}', "$.expiresInSeconds"),
        (b'{"expires_in_seconds": 60}', "user_id"),
        (b'{"user_id": ""}', "$.user_id"),
        (b'{"user_id": "user_x", "userId": "user_x"}', "one spelling"),
        (b"not json at all", "not a JSON or MessagePack object"),
    ],
)
async def test_invalid_request_names_the_problem_and_skips_clerk(
    worker: Worker,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
    body: bytes,
    names: str,
) -> None:
    """Wrong types, unknown, missing or out-of-range fields: `invalid_request`, no upstream call."""
    error = await error_of(client, body)
    assert (error.code, error.retryable, error.attempts) == ("invalid_request", False, 0)
    assert names in error.message
    assert (error.upstream_status, error.upstream_code, error.clerk_trace_id) == (None, None, None)
    assert fake_clerk.stats.create_calls == 0


async def test_non_integer_deadline_header_is_invalid_request(worker: Worker, client: SignInTokenClient) -> None:
    """An `x-deadline` that is not an integer makes the request `invalid_request`."""
    error = await error_of(client, b'{"user_id": "user_x"}', headers={"x-deadline": "tomorrow"})
    assert error.code == "invalid_request"
    assert "x-deadline" in error.message


async def test_publisher_outside_the_policy_is_forbidden(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """A caller the policy lists, asking for what its rules do not allow: `forbidden`, and Clerk is not called."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[callers.guest]\nlanes = []\nmax_expires_in_seconds = 60\nreply_to = ["amq_*"]\n')
    await start_worker(policy_file=str(policy))
    error = await error_of(client, b'{"user_id": "user_x"}')
    assert (error.code, error.retryable) == ("forbidden", False)
    assert fake_clerk.stats.create_calls == 0


async def test_allowed_publisher_is_served(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
) -> None:
    """A request whose broker-validated user_id is allowed gets its token."""
    await start_worker(allowed_publishers="guest")
    replies = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_x"}', user_id="guest", reply_to=replies.name, correlation_id="c1"),
        queue_names["REQUEST_QUEUE"],
    )
    message = await get_message(channel, replies.name)
    assert (message.correlation_id, message.headers["x-outcome"]) == ("c1", "created")


async def test_past_deadline_is_deadline_exceeded_without_a_token(
    worker: Worker,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """An `x-deadline` already passed: `deadline_exceeded`, Clerk not called."""
    error = await error_of(client, b'{"user_id": "user_x"}', deadline_ms=int(time.time() * 1000) - 1)
    assert (error.code, error.upstream_status) == ("deadline_exceeded", None)
    assert fake_clerk.stats.create_calls == 0


async def test_deadline_passing_during_retries_is_deadline_exceeded(
    worker: Worker,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """A Retry-After that would outlast `x-deadline` ends the request `deadline_exceeded`, no token."""
    fake_clerk.fail_next(503, retry_after=1)
    error = await error_of(client, b'{"user_id": "user_x"}', deadline_ms=int(time.time() * 1000) + 500)
    assert (error.code, error.upstream_status, error.attempts) == ("deadline_exceeded", 503, 1)
    assert fake_clerk.stats.created == 0


async def test_unknown_user_is_answered_user_not_found(worker: Worker, client: SignInTokenClient) -> None:
    """Clerk's 404: `user_not_found` with Clerk's status, code and trace id."""
    error = await error_of(client, b'{"user_id": "nobody"}')
    assert (error.code, error.retryable, error.upstream_status) == ("user_not_found", False, 404)
    assert error.upstream_code == "resource_not_found"
    assert error.clerk_trace_id
    assert error.attempts == 1


async def test_other_4xx_is_upstream_rejected_with_clerks_message(worker: Worker, client: SignInTokenClient) -> None:
    """Clerk's 403: `upstream_rejected` carrying Clerk's message and code."""
    error = await error_of(client, b'{"user_id": "user_x", "org_id": "acme"}')
    assert (error.code, error.upstream_status, error.upstream_code) == (
        "upstream_rejected",
        403,
        "authorization_invalid",
    )
    assert error.message == "Not a member of the organization"


@pytest.mark.parametrize("status", [400, 422])
async def test_400_and_422_are_upstream_rejected(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk, status: int
) -> None:
    """Clerk's 400 and 422: `upstream_rejected`, not retried."""
    fake_clerk.fail_next(status)
    error = await error_of(client, b'{"user_id": "user_x"}')
    assert (error.code, error.upstream_status, error.attempts) == ("upstream_rejected", status, 1)


async def test_persistent_429_is_rate_limited_after_max_attempts(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """429 on every attempt: `rate_limited`, retryable, after MAX_ATTEMPTS attempts."""
    await start_worker(max_attempts=3)
    fake_clerk.fail_next(429, count=3)
    error = await error_of(client, b'{"user_id": "user_x"}')
    assert (error.code, error.retryable, error.upstream_status, error.attempts) == ("rate_limited", True, 429, 3)
    assert fake_clerk.stats.create_calls == 3


async def test_persistent_5xx_is_upstream_unavailable(
    start_worker: WorkerFactory, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """5xx on every attempt: `upstream_unavailable`, retryable, after MAX_ATTEMPTS attempts."""
    await start_worker(max_attempts=2)
    fake_clerk.fail_next(500, count=2)
    error = await error_of(client, b'{"user_id": "user_x"}')
    assert (error.code, error.retryable, error.upstream_status, error.attempts) == (
        "upstream_unavailable",
        True,
        500,
        2,
    )


async def test_dropped_connections_are_upstream_unavailable(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """A connection closed without an answer is retried, then `upstream_unavailable` with no status."""
    await start_worker(max_attempts=2)
    fake_clerk.drop_next(2)
    error = await error_of(client, b'{"user_id": "user_x"}')
    assert (error.code, error.upstream_status, error.attempts) == ("upstream_unavailable", None, 2)


async def test_unreachable_clerk_is_upstream_unavailable(
    start_worker: WorkerFactory, client: SignInTokenClient
) -> None:
    """Nothing listening at CLERK_API_URL: `upstream_unavailable` after the retries."""
    await start_worker(max_attempts=2, clerk_api_url=f"http://127.0.0.1:{free_port()}/v1")
    error = await error_of(client, b'{"user_id": "user_x"}')
    assert (error.code, error.attempts) == ("upstream_unavailable", 2)
    assert "could not be reached" in error.message
