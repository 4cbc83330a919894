"""The reply message: body, properties, spellings, encodings, destinations."""

from __future__ import annotations

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import JSON, MSGPACK, Created

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import get_message


async def test_request_is_answered_with_clerks_token_object(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """A valid request gets `created` with Clerk's SignInToken as Clerk returned it."""
    future = await client.send(b'{"user_id": "user_alice", "expires_in_seconds": 600}', message_id="m-1")
    received = await future
    reply = received.decode()
    assert isinstance(reply, Created)
    token = reply.sign_in_token
    assert fake_clerk.stats.tokens[token.id]["token"] == token.token
    assert (token.object, token.user_id, token.status) == ("sign_in_token", "user_alice", "pending")
    assert received.headers["x-outcome"] == "created"
    assert received.content_type == JSON
    assert received.correlation_id is not None


async def test_reply_body_is_exactly_the_contracts_shape(worker: Worker, client: SignInTokenClient) -> None:
    """The JSON reply has `outcome` and `sign_in_token` and nothing else."""
    received = await (await client.send(b'{"user_id": "user_shape"}'))
    body = msgspec.json.decode(received.body)
    assert set(body) == {"outcome", "sign_in_token"}
    assert set(body["sign_in_token"]) == {
        "object",
        "id",
        "user_id",
        "token",
        "url",
        "status",
        "created_at",
        "updated_at",
    }


async def test_typescript_spelling_is_accepted(
    worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """`userId` / `expiresInSeconds` / `orgId` mean the same as the snake_case fields."""
    received = await (await client.send(b'{"userId": "user_bob", "expiresInSeconds": 60, "orgId": "org_1"}'))
    assert isinstance(received.decode(), Created)
    assert fake_clerk.stats.last_params == {"user_id": "user_bob", "expires_in_seconds": 60, "org_id": "org_1"}


async def test_org_id_is_passed_to_clerk(worker: Worker, client: SignInTokenClient, fake_clerk: FakeClerk) -> None:
    """`org_id` reaches Clerk's body; an absent `expires_in_seconds` is not sent."""
    reply = await client.request("user_carol", org_id="org_acme")
    assert isinstance(reply, Created)
    assert fake_clerk.stats.last_params == {"user_id": "user_carol", "org_id": "org_acme"}


async def test_msgpack_request_gets_msgpack_reply(worker: Worker, client: SignInTokenClient) -> None:
    """A MessagePack request is answered in MessagePack."""
    received = await (await client.send(msgspec.msgpack.encode({"user_id": "user_mp"}), content_type=MSGPACK))
    assert received.content_type == MSGPACK
    assert msgspec.msgpack.decode(received.body)["outcome"] == "created"


async def test_request_without_content_type_is_json(worker: Worker, client: SignInTokenClient) -> None:
    """No content_type means JSON, and the reply says application/json."""
    received = await (await client.send(b'{"user_id": "user_nct"}', content_type=None))
    assert received.content_type == JSON
    assert isinstance(received.decode(), Created)


async def test_reply_without_reply_to_goes_to_results_queue(
    worker: Worker,
    channel: AbstractChannel,
    queue_names: dict[str, str],
) -> None:
    """No `reply_to`: the reply goes to RESULTS_QUEUE, with the message_id as correlation_id."""
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_res"}', message_id="no-reply-to-1"),
        queue_names["REQUEST_QUEUE"],
    )
    message = await get_message(channel, queue_names["RESULTS_QUEUE"])
    assert message.correlation_id == "no-reply-to-1"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msgspec.json.decode(message.body)["outcome"] == "created"
