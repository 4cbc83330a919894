"""The broker permissions docs/security.md tells operators to grant are enough, and no more.

The table is read from the page itself, so the page cannot drift from what was tested: in a vhost
of its own, the workers' user runs a worker with the default names, a caller with its own reply
queues, one using direct reply-to and the bulk tool each get their tokens, the archiver binds a
queue to the audit trail and reads it, and no caller can read the service's queues.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from service.bulk import BulkRun
from service.config import load_settings
from service.fake_clerk import FakeClerk
from service.local_broker import LocalBroker
from service.messages import Created, decode_reply
from service.worker import Worker
from tests.conftest import SECRET_KEY, get_message, wait_until

SECURITY_PAGE = Path(__file__).parents[2] / "docs" / "security.md"


def permission_rows() -> dict[str, tuple[str, str, str]]:
    """The table under "Broker permissions": user -> (configure, write, read)."""
    text = SECURITY_PAGE.read_text(encoding="utf-8").split("## Broker permissions", 1)[1]
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| "):
            if rows:
                break
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0].startswith("`") and all(c.startswith("`") for c in cells[1:]):
            rows[cells[0].split("`")[1]] = tuple(c.strip("`") for c in cells[1:])
    return rows  # type: ignore[return-value]


@pytest.fixture
async def vhost(session_node: LocalBroker | None) -> AsyncIterator[tuple[LocalBroker, str]]:
    """A vhost of this test's own, with the page's users and permissions (password = name)."""
    if session_node is None:
        pytest.skip("needs users made with rabbitmqctl on the tests' own broker; AMQP_URL names another")
    name = f"perm-{uuid.uuid4().hex[:8]}"
    users = permission_rows()
    assert set(users) == {"sign-in-tokens", "support-portal", "orders-service", "audit-archiver", "onboarding-job"}
    # Each user named after the vhost too: users are the node's, and other tests make some of these names.
    grants = " ".join(
        f'rabbit_auth_backend_internal:add_user(<<"{name}.{u}">>, <<"{u}">>, <<"t">>),'
        f' rabbit_auth_backend_internal:set_permissions(<<"{name}.{u}">>, <<"{name}">>, <<"{c}">>, <<"{w}">>, <<"{r}">>,'
        f' <<"t">>),'
        for u, (c, w, r) in users.items()
    ).replace("\\", "\\\\")
    await session_node.ctl("eval", f'rabbit_vhost:add(<<"{name}">>, <<"t">>), {grants} ok.')
    yield session_node, name
    deletions = " ".join(f'rabbit_auth_backend_internal:delete_user(<<"{name}.{u}">>, <<"t">>),' for u in users)
    await session_node.ctl("eval", f'rabbit_vhost:delete(<<"{name}">>, <<"t">>), {deletions} ok.')


def url_as(node: LocalBroker, vhost: str, user: str) -> str:
    """The URL of the vhost as the page's ``user`` (made as ``VHOST.USER``)."""
    return node.url.replace("guest:guest", f"{vhost}.{user}:{user}").rstrip("/") + f"/{vhost}"


async def test_the_documented_permissions_serve_every_caller_and_keep_them_out_of_the_service_queues(
    vhost: tuple[LocalBroker, str], fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    node, name = vhost
    settings = load_settings(
        {
            "AMQP_URL": url_as(node, name, "sign-in-tokens"),
            "CLERK_API_URL": fake_clerk.url,
            "CLERK_SECRET_KEY": SECRET_KEY,
            "HTTP_PORT": "0",
            "HTTP_HOST": "127.0.0.1",
            "CLERK_RATE_LIMIT": "1000000",
        }
    )
    worker = Worker(settings, name="permissions-test")
    await worker.start()
    try:
        # The archiver binds its queue to the audit exchange and reads it.
        archiver = await aio_pika.connect_robust(url_as(node, name, "audit-archiver"))
        archive_channel = await archiver.channel()
        archive = await archive_channel.declare_queue("sign_in_tokens.audit.archive", durable=True)
        await archive.bind("sign_in_tokens.audit", "#")
        portal = await aio_pika.connect_robust(url_as(node, name, "support-portal"))
        channel = await portal.channel()
        replies = await channel.declare_queue("support.replies.eu", exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"user_id": "user_1"}', reply_to=replies.name, user_id=f"{name}.support-portal"),
            "sign_in_tokens.create",
        )
        reply = await get_message(channel, replies.name)
        assert isinstance(decode_reply(reply.body, reply.content_type), Created)
        # Direct reply-to: a caller with nothing but write on the default exchange.
        direct = await aio_pika.connect_robust(url_as(node, name, "orders-service"))
        direct_channel = await direct.channel()
        answer: list[aio_pika.abc.AbstractIncomingMessage] = []
        reply_to = await direct_channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_to.consume(answer.append, no_ack=True)
        await direct_channel.default_exchange.publish(
            aio_pika.Message(b'{"user_id": "user_2"}', reply_to="amq.rabbitmq.reply-to"), "sign_in_tokens.create"
        )
        await wait_until(lambda: bool(answer), what="the direct reply")
        assert answer[0].headers["x-outcome"] == "created"
        # Callers cannot read what is the service's: the results queue, the lanes, the dead letters.
        for user, queue in itertools.product(
            ("support-portal", "orders-service"),
            ("sign_in_tokens.results", "sign_in_tokens.create", "sign_in_tokens.dead"),
        ):
            probe = await (portal if user == "support-portal" else direct).channel()
            declared = await probe.get_queue(queue, ensure=False)
            with pytest.raises(ChannelAccessRefused):
                await declared.get(no_ack=True, fail=False)
        events = [await get_message(archive_channel, archive.name) for _ in range(2)]
        assert [e.routing_key for e in events] == ["created.interactive", "created.interactive"]
        # The bulk tool, as its own user: its durable reply queue declared, read and deleted.
        source = tmp_path / "users.csv"
        source.write_text("user_id\nuser_3\nuser_4\n")
        async with BulkRun(
            url_as(node, name, "onboarding-job"),
            "sign_in_tokens.create.bulk",
            source,
            tmp_path / "out.jsonl",
            tmp_path / "failed.csv",
            10,
            progress=False,
        ) as job:
            summary = await job.run(asyncio.Event())
        assert (summary.complete, summary.outcomes["created"]) == (True, 2)
        await direct.close()
        await portal.close()
        await archiver.close()
    finally:
        await worker.shutdown()
