"""The policy file against a real broker: who may ask, for what, and where the reply may go.

Callers are broker users (RabbitMQ checks a message's ``user_id`` against its connection's user).
"""

from __future__ import annotations

import json
import signal
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from sign_in_tokens_client.contract.messages import Created, Failed, Reply, decode_reply

from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, get_message, queue_depth, wait_until
from tests.workers import WorkerProcesses

POLICY = """
protected_users = ["user_admin_*"]

[defaults]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 600
allow_org_id = false
reply_to = ["amq.rabbitmq.reply-to", "amq.gen-*", "{prefix}.anyone.*"]

[callers.support-portal]
lanes = ["interactive"]
max_expires_in_seconds = 300
allow_org_id = true
reply_to = ["{prefix}.portal.*"]
"""


def policy_file(tmp_path: Path, queue_names: dict[str, str], text: str = POLICY) -> str:
    """Write the policy for this test's queues; return its path."""
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text).replace("{prefix}", prefix), encoding="utf-8")
    return str(path)


def edit(path: str, old: str, new: str) -> None:
    """Replace ``old`` with ``new`` in the file at ``path``."""
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    assert old in text
    file.write_text(text.replace(old, new), encoding="utf-8")


Ask = Callable[..., Awaitable[Reply | None]]


@pytest.fixture
def ask(connections: dict[str, AbstractRobustConnection], queue_names: dict[str, str]) -> Ask:
    """Send a request as a caller (None: without a user_id property) and return its reply.

    ``reply_to`` is a queue the test declares (its name gets the test's prefix); ``expect_reply=False``
    returns None after checking that queue is empty once the request was dead-lettered.
    """
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]

    async def send(
        caller: str | None,
        body: dict[str, Any],
        *,
        reply_to: str,
        lane: str = "REQUEST_QUEUE",
        publish_as: str = "support-portal",
    ) -> Reply | None:
        channel = await connections[caller or publish_as].channel()
        queue = await channel.declare_queue(f"{prefix}.{reply_to}", exclusive=True)
        message = aio_pika.Message(json.dumps(body).encode(), reply_to=queue.name, correlation_id="c1", user_id=caller)
        await channel.default_exchange.publish(message, queue_names[lane])
        reply = await get_message(channel, queue.name)
        await queue.delete()
        await channel.close()
        return decode_reply(reply.body, reply.content_type)

    return send


def error_code(reply: Reply | None) -> tuple[str, str]:
    assert isinstance(reply, Failed), reply
    return reply.error.code, reply.error.message


async def test_each_rule_refuses_as_forbidden_naming_it_and_clerk_is_not_called(
    start_worker: WorkerFactory, ask: Ask, tmp_path: Path, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """Over the maximum expiry, org_id without allow_org_id, a lane not listed, a protected user: forbidden."""
    await start_worker(policy_file=policy_file(tmp_path, queue_names))
    portal = "support-portal"
    over = await ask(portal, {"user_id": "user_1", "expires_in_seconds": 301}, reply_to="portal.r")
    assert error_code(over) == (
        "forbidden",
        "max_expires_in_seconds: caller 'support-portal' may ask for at most 300 seconds, not 301",
    )
    org = await ask("billing", {"user_id": "user_1", "org_id": "org_1"}, reply_to="anyone.r")
    assert error_code(org) == ("forbidden", "allow_org_id: [defaults] may not set org_id")
    lane = await ask(portal, {"user_id": "user_1"}, reply_to="portal.r", lane="BULK_QUEUE")
    assert error_code(lane) == ("forbidden", "lanes: caller 'support-portal' may not use the bulk lane")
    protected = await ask(portal, {"user_id": "user_admin_42"}, reply_to="portal.r")
    assert error_code(protected)[0] == "forbidden"
    assert "protected_users" in error_code(protected)[1]
    assert fake_clerk.stats.create_calls == 0


async def test_within_its_rules_a_caller_gets_a_token_capped_at_its_maximum(
    start_worker: WorkerFactory, ask: Ask, tmp_path: Path, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """No expires_in_seconds: the caller's maximum is sent to Clerk, not Clerk's 30-day default."""
    await start_worker(policy_file=policy_file(tmp_path, queue_names))
    reply = await ask("support-portal", {"user_id": "user_1", "org_id": "org_1"}, reply_to="portal.r")
    assert isinstance(reply, Created)
    assert fake_clerk.stats.last_params is not None
    assert fake_clerk.stats.last_params["expires_in_seconds"] == 300
    assert fake_clerk.stats.last_params["org_id"] == "org_1"


async def refused_outright(
    connections: dict[str, AbstractRobustConnection],
    channel: AbstractChannel,
    queue_names: dict[str, str],
    caller: str | None,
    reply_to: str,
) -> None:
    """Publish as ``caller`` (None: without user_id) with another team's queue as ``reply_to``: nothing goes there.

    The request is dead-lettered ``forbidden_caller``.
    """
    sender = await connections[caller or "outsider"].channel()
    victim = await channel.declare_queue(reply_to, exclusive=True)
    message = aio_pika.Message(b'{"user_id": "user_1"}', reply_to=victim.name, correlation_id="c1", user_id=caller)
    await sender.default_exchange.publish(message, queue_names["REQUEST_QUEUE"])
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "forbidden_caller"
    assert await queue_depth(channel, victim.name) == 0
    await victim.delete()
    await sender.close()


async def test_a_caller_with_no_rules_gets_nothing_anywhere(
    start_worker: WorkerFactory,
    tmp_path: Path,
    queue_names: dict[str, str],
    connections: dict[str, AbstractRobustConnection],
    channel: AbstractChannel,
    fake_clerk: FakeClerk,
    ask: Ask,
) -> None:
    """No [defaults]: a caller not listed, and one without user_id, get no reply, not even in another team's queue."""
    only_portal = POLICY.split("[defaults]", maxsplit=1)[0] + "[callers" + POLICY.split("[callers")[1]
    await start_worker(policy_file=policy_file(tmp_path, queue_names, only_portal))
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    await refused_outright(connections, channel, queue_names, "outsider", f"{prefix}.billing.replies")
    await refused_outright(connections, channel, queue_names, None, f"{prefix}.billing.replies")
    assert fake_clerk.stats.create_calls == 0
    assert isinstance(await ask("support-portal", {"user_id": "user_1"}, reply_to="portal.r"), Created)


async def test_without_a_user_id_only_anonymous_applies_never_defaults(
    start_worker: WorkerFactory,
    ask: Ask,
    tmp_path: Path,
    queue_names: dict[str, str],
    connections: dict[str, AbstractRobustConnection],
    channel: AbstractChannel,
    fake_clerk: FakeClerk,
) -> None:
    """The portal leaving out user_id is not the portal, nor [defaults]' caller: [anonymous] only, else nothing."""
    path = policy_file(tmp_path, queue_names)
    worker = await start_worker(policy_file=path)
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    # [defaults] and no [anonymous]: a nameless request on the bulk lane (which [defaults] has) gets nothing.
    await refused_outright(connections, channel, queue_names, None, f"{prefix}.anyone.r")
    assert fake_clerk.stats.create_calls == 0
    anonymous = '[anonymous]\nlanes = ["bulk"]\nmax_expires_in_seconds = 60\nreply_to = ["{prefix}.anon.*"]\n'
    edit(path, "[callers.support-portal]", anonymous.replace("{prefix}", prefix) + "\n[callers.support-portal]")
    assert worker.reload_policy()
    reply = await ask(None, {"user_id": "user_1"}, reply_to="anon.r", lane="BULK_QUEUE")
    assert isinstance(reply, Created)
    assert fake_clerk.stats.last_params is not None
    assert fake_clerk.stats.last_params["expires_in_seconds"] == 60
    interactive = await ask(None, {"user_id": "user_1"}, reply_to="anon.r")
    assert error_code(interactive) == ("forbidden", "lanes: [anonymous] may not use the interactive lane")


async def test_a_reply_to_outside_the_callers_list_gets_nothing_and_is_dead_lettered(
    start_worker: WorkerFactory,
    tmp_path: Path,
    queue_names: dict[str, str],
    connections: dict[str, AbstractRobustConnection],
    channel: AbstractChannel,
    fake_clerk: FakeClerk,
) -> None:
    """The portal asks for its reply in a queue of [defaults]' list: nothing is sent there, no token is made."""
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    audit = await channel.declare_exchange(f"{prefix}.audit", aio_pika.ExchangeType.TOPIC, durable=True)
    events = await channel.declare_queue(exclusive=True)
    await events.bind(audit, "refused.*")
    await start_worker(policy_file=policy_file(tmp_path, queue_names), audit_exchange=audit.name)
    portal = await connections["support-portal"].channel()
    elsewhere = await portal.declare_queue(f"{prefix}.anyone.stolen", exclusive=True)
    await portal.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_1"}', reply_to=elsewhere.name, user_id="support-portal", message_id="m1"),
        queue_names["REQUEST_QUEUE"],
    )
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "forbidden_reply_to"
    assert dead.headers["x-original-user-id"] == "support-portal"
    assert (dead.body, dead.reply_to, dead.message_id) == (b'{"user_id": "user_1"}', elsewhere.name, "m1")
    assert await queue_depth(portal, elsewhere.name) == 0
    assert fake_clerk.stats.create_calls == 0
    event = json.loads((await get_message(channel, events.name)).body)
    assert (event["event"], event["code"], event["caller"], event["message_id"]) == (
        "refused",
        "forbidden",
        "support-portal",
        "m1",
    )
    # Without reply_to the reply would go to RESULTS_QUEUE, which no caller lists here: dead-lettered too.
    await portal.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_1"}', user_id="support-portal"), queue_names["REQUEST_QUEUE"]
    )
    assert (await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])).headers["x-dead-letter-reason"] == (
        "forbidden_reply_to"
    )
    assert await queue_depth(channel, queue_names["RESULTS_QUEUE"]) == 0
    await audit.delete()


async def test_a_bad_policy_file_stops_the_start_and_allowed_publishers_cannot_join_it(
    worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    """One line naming the file and the place; exit 2; ALLOWED_PUBLISHERS with POLICY_FILE is refused too."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[callers.portal]\nlanes = ["interactive", "express"]\nmax_expires_in_seconds = 60\nreply_to = []\n')
    worker = worker_processes.spawn(POLICY_FILE=str(bad))
    assert worker.process.wait(30) == 2
    output = worker.log_path.read_text()
    assert output.count("\n") == 1, output
    assert f"POLICY_FILE: {bad} at callers.portal.lanes[1]" in output
    both = worker_processes.spawn(POLICY_FILE=str(bad), ALLOWED_PUBLISHERS="billing")
    assert both.process.wait(30) == 2
    assert "ALLOWED_PUBLISHERS: cannot be used with POLICY_FILE" in both.log_path.read_text()


async def test_sighup_applies_a_new_policy_while_requests_are_in_flight(
    worker_processes: WorkerProcesses,
    tmp_path: Path,
    queue_names: dict[str, str],
    connections: dict[str, AbstractRobustConnection],
    fake_clerk: FakeClerk,
) -> None:
    """Requests already at Clerk finish under the old rules, once each; later ones get the new rules.

    A bad file at the next SIGHUP keeps the rules in force and says why in the log.
    """
    path = policy_file(tmp_path, queue_names)
    worker = await worker_processes.start(POLICY_FILE=path)
    fake_clerk.latency_seconds = 1.0
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    portal = await connections["support-portal"].channel()
    replies = await portal.declare_queue(f"{prefix}.portal.r", exclusive=True)
    got: dict[str, Reply] = {}
    duplicates: list[str] = []

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = str(message.correlation_id)
        if key in got:
            duplicates.append(key)
        got[key] = decode_reply(message.body, message.content_type)

    await replies.consume(on_reply, no_ack=True)

    async def send(name: str) -> None:
        body = json.dumps({"user_id": f"user_{name}"}).encode()
        message = aio_pika.Message(body, reply_to=replies.name, correlation_id=name, user_id="support-portal")
        await portal.default_exchange.publish(message, queue_names["REQUEST_QUEUE"])

    for i in range(20):
        await send(f"before{i}")
    await wait_until(lambda: fake_clerk.stats.create_calls >= 20, what="20 requests at Clerk")
    # The new rules take the interactive lane away from the portal.
    edit(path, 'lanes = ["interactive"]', 'lanes = ["bulk"]')
    worker.process.send_signal(signal.SIGHUP)
    await wait_until(lambda: "policy_reloaded" in worker_processes.logs(), what="the reload")
    for i in range(5):
        await send(f"after{i}")
    await wait_until(lambda: len(got) == 25, timeout=20, what="25 replies")
    assert all(isinstance(got[f"before{i}"], Created) for i in range(20))
    assert {error_code(got[f"after{i}"])[1] for i in range(5)} == {
        "lanes: caller 'support-portal' may not use the interactive lane"
    }
    assert duplicates == []
    # A broken file: the reload fails, the rules stay, the worker goes on.
    edit(path, "protected_users = [", "protected_users = 12 #")
    worker.process.send_signal(signal.SIGHUP)
    await wait_until(lambda: "policy_reload_failed" in worker_processes.logs(), what="the failed reload")
    failure = next(json.loads(line) for line in worker_processes.logs().splitlines() if "policy_reload_failed" in line)
    assert failure["reason"].startswith(f"POLICY_FILE: {path} at protected_users: Expected `array`")
    await send("after_bad_reload")
    await wait_until(lambda: "after_bad_reload" in got, what="a reply under the kept rules")
    assert "may not use the interactive lane" in error_code(got["after_bad_reload"])[1]
    assert worker.alive()
