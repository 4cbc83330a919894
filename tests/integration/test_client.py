"""The client library as another team uses it: typed tokens, one exception a code, deadlines, reconnects."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sign_in_tokens_client.client import (
    ForbiddenError,
    InvalidRequestError,
    SignInToken,
    SignInTokenClient,
    SignInTokenError,
    UpstreamUnavailableError,
    UserNotFoundError,
)
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.replies import ConnectionLostError, NoReplyError

from service.local.fake_clerk import FakeClerk, Fault
from service.local.rabbitmq import LocalBroker
from tests.conftest import SettingsFactory, WorkerFactory, wait_until


@pytest.fixture
async def direct(amqp_url: str, queue_names: dict[str, str]) -> SignInTokenClient:
    """A client with the defaults a caller gets: direct reply-to."""
    client = SignInTokenClient(
        amqp_url, request_queue=queue_names["REQUEST_QUEUE"], bulk_queue=queue_names["BULK_QUEUE"]
    )
    await client.connect()
    yield client  # type: ignore[misc]
    await client.close()


async def test_many_concurrent_creates_on_one_connection_get_typed_tokens(
    worker: object, direct: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """50 calls at once, both lanes, JSON and MessagePack: each its own token, replies by direct reply-to."""
    assert direct.reply_queue == "amq.rabbitmq.reply-to"
    calls = [
        direct.create(
            f"user_{i}", expires_in_seconds=60, lane=Lane.BULK if i % 2 else Lane.INTERACTIVE, msgpack=i % 3 == 0
        )
        for i in range(50)
    ]
    tokens = await asyncio.gather(*calls)
    assert all(isinstance(t, SignInToken) for t in tokens)
    assert [t.user_id for t in tokens] == [f"user_{i}" for i in range(50)]
    assert len({t.id for t in tokens}) == 50
    assert fake_clerk.stats.create_calls == 50


async def test_each_error_code_raises_its_class_with_the_replys_fields(
    start_worker: WorkerFactory, direct: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """user_not_found, invalid_request, upstream_unavailable, forbidden: a class each, the error's fields on it."""
    await start_worker(max_attempts=2)
    with pytest.raises(UserNotFoundError) as missing:
        await direct.create("nobody")
    assert (missing.value.code, missing.value.upstream_status, missing.value.upstream_code) == (
        "user_not_found",
        404,
        "resource_not_found",
    )
    assert missing.value.clerk_trace_id
    assert (missing.value.retryable, missing.value.attempts) == (False, 1)
    with pytest.raises(InvalidRequestError, match=r"expires_in_seconds"):
        await direct.create("user_1", expires_in_seconds=0)
    fake_clerk.faults.extend([Fault(503), Fault(503)])
    with pytest.raises(UpstreamUnavailableError) as unavailable:
        await direct.create("user_1")
    assert (unavailable.value.retryable, unavailable.value.attempts, unavailable.value.upstream_status) == (
        True,
        2,
        503,
    )
    assert isinstance(unavailable.value, SignInTokenError)


async def test_forbidden_is_raised_for_a_request_the_policy_refuses(
    start_worker: WorkerFactory, direct: SignInTokenClient, tmp_path: Path
) -> None:
    """The client's user may use the bulk lane only: an interactive request is forbidden, naming the rule."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[callers.guest]\nlanes = ["bulk"]\nmax_expires_in_seconds = 60\nreply_to = ["amq.rabbitmq.reply-to"]\n'
    )
    await start_worker(policy_file=str(policy))
    with pytest.raises(ForbiddenError, match="lanes: caller 'guest' may not use the interactive lane"):
        await direct.create("user_1")


async def test_a_caller_without_rules_gets_no_reply_and_its_call_ends_at_its_timeout(
    start_worker: WorkerFactory, direct: SignInTokenClient
) -> None:
    """ALLOWED_PUBLISHERS lists someone else: nothing comes back, and the call ends after its timeout with one line."""
    await start_worker(allowed_publishers="someone-else")
    with pytest.raises(NoReplyError, match="no reply within 1 s"):
        await direct.create("user_1", timeout=1)


async def test_the_same_message_id_gets_the_same_token(worker: object, direct: SignInTokenClient) -> None:
    """A caller's own message_id makes a retry safe: the service answers it from its idempotency store."""
    first = await direct.create("user_1", message_id="onboarding-42")
    again = await direct.create("user_1", message_id="onboarding-42")
    assert (again.id, again.token) == (first.id, first.token)


async def test_a_call_that_gave_up_leaves_no_token_created_behind_its_back(
    worker: object, direct: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """Clerk slower than the call's timeout: NoReplyError, and the token Clerk made after the deadline is revoked."""
    fake_clerk.latency_seconds = 0.6
    started = time.monotonic()
    with pytest.raises(NoReplyError):
        await direct.create("user_1", timeout=0.3)
    assert time.monotonic() - started < 0.6
    await wait_until(lambda: fake_clerk.stats.created == 1 and len(fake_clerk.stats.revoked) == 1, what="the revoke")
    assert set(fake_clerk.stats.tokens) == fake_clerk.stats.revoked


async def test_a_lost_connection_fails_waiting_calls_at_once_and_the_client_reconnects(
    node: LocalBroker, make_settings: SettingsFactory, queue_names: dict[str, str]
) -> None:
    """The broker restarts while a call waits: ConnectionLostError, not a hang; once it is back, calls work again."""
    client = SignInTokenClient(node.url, request_queue=queue_names["REQUEST_QUEUE"])
    await client.connect()
    try:
        waiting = asyncio.ensure_future(client.create("user_1", timeout=60))  # no worker: no reply will come
        await wait_until(lambda: bool(client._pending), what="the call published")
        await node.stop_async()
        with pytest.raises(ConnectionLostError, match="same message_id"):
            await asyncio.wait_for(waiting, 10)
        await node.start()
        from service.worker.lifecycle import Worker  # noqa: PLC0415

        worker = Worker(make_settings(amqp_url=node.url), name="client-reconnect-worker")
        await worker.start()
        try:
            deadline = time.monotonic() + 30
            while True:  # the client's robust connection comes back by itself, within its reconnect interval
                try:
                    token = await client.create("user_2", timeout=5)
                    break
                except (ConnectionLostError, NoReplyError):
                    assert time.monotonic() < deadline, "no token 30 s after the broker came back"
                    await asyncio.sleep(0.5)  # wait-ok: the poll interval of a condition wait
            assert token.user_id == "user_2"
        finally:
            await worker.shutdown()
    finally:
        await client.close()
