"""The publishing channel lost while Clerk is called: the reply still arrives, one token."""

from __future__ import annotations

from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import wait_until


async def test_publishing_channel_lost_mid_request_still_delivers_the_one_token(
    worker: Worker,
    client: SignInTokenClient,
    fake_clerk: FakeClerk,
) -> None:
    """The reply channel dies while Clerk is called; it reopens and the reply carries the only token."""
    fake_clerk.latency_seconds = 0.3
    future = await client.send(b'{"user_id": "user_fate"}', message_id="fate-1")
    await wait_until(lambda: fake_clerk.stats.create_calls == 1, what="the upstream call")
    publisher_channel = worker._publisher._channel  # type: ignore[union-attr]
    underlay = await publisher_channel.get_underlay_channel()  # type: ignore[union-attr]
    await underlay.close()  # an unexpected close: the robust channel reopens by itself
    reply = (await future).decode()
    assert isinstance(reply, Created)
    assert fake_clerk.stats.created == 1
    assert reply.sign_in_token.id in fake_clerk.stats.tokens
