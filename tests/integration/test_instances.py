"""Which Clerk instance a request goes to (contract v3): the header x-clerk-instance, against a real broker."""

from __future__ import annotations

from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue
from sign_in_tokens_client.contract.messages import Created, Failed, Reply, decode_reply

from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, events, get_message, queue_depth


async def ask(channel: AbstractChannel, queue: str, instance: object) -> Reply:
    """A request naming ``instance`` (None: no header), and its reply."""
    replies = await channel.declare_queue(exclusive=True)
    headers = None if instance is None else {"x-clerk-instance": instance}
    message = aio_pika.Message(b'{"user_id": "user_1"}', reply_to=replies.name, user_id="guest", headers=headers)
    await channel.default_exchange.publish(message, queue)
    got = await get_message(channel, replies.name)
    await replies.delete()
    return decode_reply(got.body, got.content_type)


def refusal(reply: Reply) -> tuple[str, str]:
    assert isinstance(reply, Failed), reply
    return reply.error.code, reply.error.message


async def test_the_one_instance_is_default_and_any_other_name_is_refused(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    audit_exchange: str,
    audit_queue: AbstractQueue,
) -> None:
    """No header, or default: served, the event naming the instance; another name, or not a string: invalid_request."""
    await start_worker(audit_exchange=audit_exchange)
    queue = queue_names["REQUEST_QUEUE"]
    assert isinstance(await ask(channel, queue, None), Created)
    assert isinstance(await ask(channel, queue, "default"), Created)
    assert refusal(await ask(channel, queue, "prod")) == (
        "invalid_request",
        "x-clerk-instance: there is no Clerk instance 'prod'",
    )
    assert refusal(await ask(channel, queue, 7)) == (
        "invalid_request",
        "header x-clerk-instance must name a Clerk instance (a string of 1 to 255 characters)",
    )
    got = await events(audit_queue, 4)
    assert [event["instance"] for _, event in got] == ["default", "default", None, None]
    assert fake_clerk.stats.create_calls == 2


async def test_under_a_policy_a_name_the_caller_may_not_use_is_forbidden_whether_or_not_it_exists(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nlanes = ["interactive"]\nmax_expires_in_seconds = 60\nreply_to = ["*"]\n')
    await start_worker(policy_file=str(policy))
    queue = queue_names["REQUEST_QUEUE"]
    for name in ("prod", "staging"):
        assert refusal(await ask(channel, queue, name)) == (
            "forbidden",
            f"instances: [defaults] may not use instance {name!r}",
        )
    assert isinstance(await ask(channel, queue, None), Created)
    assert fake_clerk.stats.create_calls == 1


async def test_an_undecodable_request_naming_no_queue_is_dead_lettered_whatever_instance_it_names(
    start_worker: WorkerFactory, channel: AbstractChannel, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """Not an object and no reply_to: dead-lettered undecodable, before its instance is refused, as always."""
    await start_worker()
    for instance in ("prod", 7, ""):
        message = aio_pika.Message(b"\xff\x00 not an object", user_id="guest", headers={"x-clerk-instance": instance})
        await channel.default_exchange.publish(message, queue_names["REQUEST_QUEUE"])
        dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
        assert dead.headers["x-dead-letter-reason"] == "undecodable"
    assert await queue_depth(channel, queue_names["RESULTS_QUEUE"]) == 0
    assert fake_clerk.stats.create_calls == 0
