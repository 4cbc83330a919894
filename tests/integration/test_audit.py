"""The audit trail: an event for every outcome, confirmed before the ack, never the token."""

from __future__ import annotations

import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import Created

from service.local.fake_clerk import FakeClerk
from service.worker.lifecycle import Worker
from tests.conftest import WorkerFactory, events, get_message, queue_depth, wait_until

FIELDS = {
    "event", "kind", "instance", "caller", "user_id", "actor_sub", "actor", "org_id", "sign_in_token_id", "actor_token_id",
    "expires_in_seconds", "lane", "correlation_id", "message_id", "code", "at",
}  # fmt: skip


async def test_every_outcome_is_an_event_with_the_contracts_fields_and_never_the_token(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    channel: AbstractChannel,
    audit_exchange: str,
    audit_queue: AbstractQueue,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
) -> None:
    """created, failed (Clerk's 404, a bad body, an undecodable one), and a token revoked."""
    await start_worker(audit_exchange=audit_exchange)
    created = (await (await client.send(b'{"user_id": "user_1", "expires_in_seconds": 60}', message_id="m1"))).decode()
    assert isinstance(created, Created)
    missing = await (await client.send(b'{"user_id": "nobody"}', lane=Lane.BULK))
    invalid = await (await client.send(b'{"user_id": 12}'))
    assert (missing.headers["x-outcome"], invalid.headers["x-outcome"]) == ("failed", "failed")
    got = await events(audit_queue, 3)
    assert [key for key, _ in got] == ["created.interactive", "failed.bulk", "failed.interactive"]
    for _, event in got:
        assert set(event) == FIELDS
        assert event["at"].endswith("Z")
    first = got[0][1]
    assert first["caller"] == "guest"  # the client sends its connection's user as the user_id property
    assert (first["user_id"], first["sign_in_token_id"], first["expires_in_seconds"]) == (
        "user_1",
        created.sign_in_token.id,
        60,
    )
    assert (first["message_id"], first["code"], first["lane"]) == ("m1", None, "interactive")
    assert (got[1][1]["code"], got[2][1]["code"]) == ("user_not_found", "invalid_request")

    # A request as guest whose reply nobody can receive: created, then revoked, then dead-lettered.
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_2"}', user_id="guest", reply_to="no.such.queue.anywhere"),
        queue_names["REQUEST_QUEUE"],
    )
    revoked = await events(audit_queue, 2)
    assert [key for key, _ in revoked] == ["created.interactive", "revoked.interactive"]
    token_id = revoked[0][1]["sign_in_token_id"]
    assert (revoked[1][1]["sign_in_token_id"], revoked[1][1]["caller"]) == (token_id, "guest")
    assert fake_clerk.stats.revoked == {token_id}
    # Undecodable, without reply_to: dead-lettered, recorded as failed.
    await channel.default_exchange.publish(aio_pika.Message(b"\xff not an object"), queue_names["REQUEST_QUEUE"])
    undecodable = await events(audit_queue, 1)
    assert undecodable[0][0] == "failed.interactive"
    assert (undecodable[0][1]["code"], undecodable[0][1]["user_id"]) == ("invalid_request", None)
    # No event carries a token or a URL: ids only.
    tokens = fake_clerk.stats.tokens.values()
    secrets = [t["token"] for t in tokens] + [t["url"] for t in tokens]
    for _, event in [*got, *revoked, *undecodable]:
        text = json.dumps(event)
        assert not any(secret in text for secret in secrets)
        assert "eyJ" not in text


async def test_a_caller_without_rules_is_a_refused_event_and_gets_nothing(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    channel: AbstractChannel,
    audit_exchange: str,
    audit_queue: AbstractQueue,
    queue_names: dict[str, str],
) -> None:
    """ALLOWED_PUBLISHERS lists another caller: the client's request is refused (code forbidden), dead-lettered, unanswered."""
    await start_worker(audit_exchange=audit_exchange, allowed_publishers="billing")
    pending = await client.send(b'{"user_id": "user_1"}', lane=Lane.BULK)
    ((key, event),) = await events(audit_queue, 1)
    assert (key, event["code"], event["user_id"], event["caller"]) == ("refused.bulk", "forbidden", None, "guest")
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert (dead.headers or {})["x-dead-letter-reason"] == "forbidden_caller"
    assert not pending.done()


async def test_the_ack_and_the_reply_wait_for_the_events_confirm(
    start_worker: WorkerFactory,
    client: SignInTokenClient,
    channel: AbstractChannel,
    audit_exchange: str,
    audit_queue: AbstractQueue,
    queue_names: dict[str, str],
) -> None:
    """While the broker refuses the event (a bound queue full, reject-publish), no reply and no ack; then both."""
    worker: Worker = await start_worker(audit_exchange=audit_exchange)
    full = await channel.declare_queue(
        f"{audit_exchange}.full", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await full.bind(audit_exchange, "#")
    pending = await client.send(b'{"user_id": "user_1"}')
    await wait_until(lambda: value(worker.metrics.audit_unconfirmed) >= 1, what="an event the broker refused")
    assert not pending.done()
    # Still in the worker's hands, unacknowledged (the queue shows it as neither ready nor gone).
    assert value(worker.metrics.labelled(worker.metrics.in_flight, "interactive")) == 1
    await full.delete(if_unused=False, if_empty=False)
    reply = (await pending).decode()
    assert isinstance(reply, Created)
    # The refused attempts may have reached the other bound queue too; the last is the confirmed one.
    assert await queue_depth(channel, audit_queue.name) >= 1
    assert await queue_depth(channel, queue_names["REQUEST_QUEUE"]) == 0


def value(metric: Any) -> float:
    """A counter's or gauge's current value."""
    return float(metric._value.get())


async def test_an_audit_exchange_deleted_under_the_worker_is_declared_again(
    start_worker: WorkerFactory, client: SignInTokenClient, amqp: Any, audit_exchange: str
) -> None:
    """An operator deletes the exchange: the publish fails, the worker declares it again, the request is answered."""
    worker: Worker = await start_worker(audit_exchange=audit_exchange)
    channel = await amqp.channel()
    await channel.exchange_delete(audit_exchange)
    reply = (await (await client.send(b'{"user_id": "user_1"}'))).decode()
    assert isinstance(reply, Created)
    assert value(worker.metrics.audit_unconfirmed) >= 1
    await channel.declare_exchange(audit_exchange, passive=True)  # it exists again
    await channel.exchange_delete(audit_exchange)
