"""Revocation through the queue: only the caller a token was given to may revoke it."""

from __future__ import annotations

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.client import ForbiddenError, InvalidRequestError, SignInTokenClient
from sign_in_tokens_client.contract.messages import Failed, decode_reply

from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, get_message


def client_as(url: str, queue_names: dict[str, str]) -> SignInTokenClient:
    return SignInTokenClient(
        url,
        request_queue=queue_names["REQUEST_QUEUE"],
        bulk_queue=queue_names["BULK_QUEUE"],
        revoke_queue=queue_names["REVOKE_QUEUE"],
    )


async def test_the_caller_who_got_a_token_revokes_it_and_no_one_else_can(
    start_worker: WorkerFactory, caller_urls: dict[str, str], queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """The portal's token: billing is refused (forbidden, Clerk not called), the portal revokes it."""
    await start_worker()
    await revoke_scenario(caller_urls, queue_names, fake_clerk)


async def test_with_redis_any_worker_knows_who_got_a_token(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    redis_url: str,
) -> None:
    """The record of who got which token is shared in Redis: two workers, either may serve the revocation."""
    await start_worker(redis_url=redis_url)
    await start_worker(redis_url=redis_url)
    await revoke_scenario(caller_urls, queue_names, fake_clerk)


async def revoke_scenario(caller_urls: dict[str, str], queue_names: dict[str, str], fake_clerk: FakeClerk) -> None:
    """The portal gets a token; billing may not revoke it; the portal does; made-up and empty ids are refused."""
    async with (
        client_as(caller_urls["support-portal"], queue_names) as portal,
        client_as(caller_urls["billing"], queue_names) as billing,
    ):
        token = await portal.create("user_1", expires_in_seconds=300)
        with pytest.raises(ForbiddenError, match="was not given to this caller"):
            await billing.revoke(token.id)
        assert fake_clerk.stats.revoke_calls == 0
        revoked = await portal.revoke(token.id)
        assert (revoked.id, revoked.status, revoked.user_id) == (token.id, "revoked", "user_1")
        assert fake_clerk.stats.revoked == {token.id}
        with pytest.raises(ForbiddenError):
            await portal.revoke("sit_never_given_to_anyone")
        with pytest.raises(InvalidRequestError):
            await portal.revoke("")


async def test_a_bad_revocation_body_is_invalid_request_naming_the_field(
    worker: object, channel: AbstractChannel, queue_names: dict[str, str]
) -> None:
    """The body is {"sign_in_token_id": ...} (or signInTokenId); anything else is refused by name."""
    replies = await channel.declare_queue(exclusive=True)
    for body, names in ((b'{"token": "sit_1"}', "token"), (b'{"signInTokenId": 7}', "$.signInTokenId")):
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=replies.name), queue_names["REVOKE_QUEUE"]
        )
        message = await get_message(channel, replies.name)
        reply = decode_reply(message.body, message.content_type)
        assert isinstance(reply, Failed)
        assert reply.error.code == "invalid_request"
        assert names in reply.error.message
