"""The broker permissions docs/security.md tells operators to grant are enough, and no more.

The table is read from the page itself, so the page cannot drift from what was tested: in a vhost
of its own, the workers' user runs a worker with the default names, the policy deploy/kubernetes
ships and a Redis user with exactly the page's ACL; a caller with its own reply queues, one using
direct reply-to and the bulk tool each get their tokens, the archiver reads the archive the workers
keep, and no caller can read the service's queues.
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
import redis.asyncio
import yaml
from aiormq.exceptions import ChannelAccessRefused
from sign_in_tokens_client.client import SignInTokenClient

from service.callers.bulk import BulkRun, BulkService
from service.config import load_settings
from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from service.worker.lifecycle import Worker
from tests.conftest import SECRET_KEY, wait_until

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


SHIPPED_POLICY = Path(__file__).parents[2] / "deploy" / "kubernetes" / "configmap.yaml"


def redis_acl() -> str:
    """The ACL SETUSER line docs/security.md gives for the service's Redis user."""
    text = SECURITY_PAGE.read_text(encoding="utf-8")
    (line,) = [line.strip() for line in text.splitlines() if line.strip().startswith("ACL SETUSER sign-in-tokens")]
    return line


def shipped_policy(tmp_path: Path) -> str:
    """The policy file deploy/kubernetes ships, written out; its path."""
    documents = list(yaml.safe_load_all(SHIPPED_POLICY.read_text(encoding="utf-8")))
    (policy,) = [d["data"]["policy.toml"] for d in documents if "policy.toml" in d.get("data", {})]
    path = tmp_path / "policy.toml"
    path.write_text(policy, encoding="utf-8")
    return str(path)


@pytest.fixture
async def vhost(session_node: LocalBroker | None) -> AsyncIterator[tuple[LocalBroker, str]]:
    """A vhost of this test's own; the page's users (made once, password = name) have the page's permissions on it."""
    if session_node is None:
        pytest.skip("needs users made with rabbitmqctl on the tests' own broker; AMQP_URL names another")
    name = f"perm-{uuid.uuid4().hex[:8]}"
    users = permission_rows()
    assert set(users) == {"sign-in-tokens", "support-portal", "orders-service", "audit-archiver", "onboarding-job"}
    grants = " ".join(
        f'catch rabbit_auth_backend_internal:add_user(<<"{u}">>, <<"{u}">>, <<"t">>),'
        f' rabbit_auth_backend_internal:set_permissions(<<"{u}">>, <<"{name}">>, <<"{c}">>, <<"{w}">>, <<"{r}">>,'
        f' <<"t">>),'
        for u, (c, w, r) in users.items()
    ).replace("\\", "\\\\")
    await session_node.ctl("eval", f'rabbit_vhost:add(<<"{name}">>, <<"t">>), {grants} ok.')
    yield session_node, name
    await session_node.ctl("eval", f'rabbit_vhost:delete(<<"{name}">>, <<"t">>), ok.')


@pytest.fixture
async def redis_as_service(redis_url: str) -> AsyncIterator[str]:
    """REDIS_URL as the ACL user docs/security.md gives the service, and nothing more."""
    admin = redis.asyncio.Redis.from_url(redis_url)
    await admin.execute_command(*redis_acl().replace(">PASSWORD", ">redis-pw").split())
    yield redis_url.replace("redis://", "redis://sign-in-tokens:redis-pw@")
    await admin.execute_command("ACL", "DELUSER", "sign-in-tokens")
    await admin.aclose()


def url_as(node: LocalBroker, vhost: str, user: str) -> str:
    """The URL of the vhost as the page's ``user``."""
    return node.url.replace("guest:guest", f"{user}:{user}").rstrip("/") + f"/{vhost}"


async def read_stream(channel: aio_pika.abc.AbstractChannel, name: str, count: int) -> list[str]:
    """The routing keys of the first ``count`` events of the archive stream, read from its start."""
    await channel.set_qos(prefetch_count=100)
    queue = await channel.get_queue(name, ensure=False)
    keys: list[str] = []

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        keys.append(message.routing_key or "")
        await message.ack()

    await queue.consume(on_event, arguments={"x-stream-offset": "first"})
    await wait_until(lambda: len(keys) >= count, what=f"{count} archived events")
    return keys


async def test_the_documented_permissions_policy_and_redis_acl_serve_every_caller_and_no_more(
    vhost: tuple[LocalBroker, str], fake_clerk: FakeClerk, tmp_path: Path, redis_as_service: str
) -> None:
    """The page's broker users, the shipped policy and the page's Redis user: every caller served, none beyond."""
    node, name = vhost
    settings = load_settings(
        {
            "AMQP_URL": url_as(node, name, "sign-in-tokens"),
            "REDIS_URL": redis_as_service,
            "POLICY_FILE": shipped_policy(tmp_path),
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
        assert all(worker.readiness().values()), worker.readiness()
        # The portal, with a reply queue under its own prefix.
        async with SignInTokenClient(
            url_as(node, name, "support-portal"),
            replies="queue",
            reply_queue_prefix="support.replies.",
            service_user="sign-in-tokens",
        ) as portal:
            assert portal.reply_queue.startswith("support.replies.")
            assert (await portal.create("user_1", timeout=10)).user_id == "user_1"
            await portal.revoke((await portal.create("user_2", timeout=10)).id, timeout=10)
        # Direct reply-to: a caller with nothing but write on the default exchange.
        async with SignInTokenClient(url_as(node, name, "orders-service"), service_user="sign-in-tokens") as orders:
            assert (await orders.create("user_3", timeout=10)).user_id == "user_3"
        # Callers cannot read what is the service's: the results queue, the lanes, the dead letters, the archive.
        for user, queue in itertools.product(
            ("support-portal", "orders-service"),
            ("sign_in_tokens.results", "sign_in_tokens.create", "sign_in_tokens.dead", "sign_in_tokens.audit.archive"),
        ):
            connection = await aio_pika.connect(url_as(node, name, user))
            probe = await connection.channel()
            declared = await probe.get_queue(queue, ensure=False)
            with pytest.raises(ChannelAccessRefused):
                await declared.get(no_ack=True, fail=False)
            await connection.close()
        # The bulk tool, as its own user: its reply queue under its own prefix, declared, read and deleted.
        source = tmp_path / "users.csv"
        source.write_text("user_id\nuser_4\nuser_5\n")
        async with BulkRun(
            BulkService(
                url_as(node, name, "onboarding-job"), "sign_in_tokens.create.bulk", "onboarding-job", "sign-in-tokens"
            ),
            source,
            tmp_path / "out.jsonl",
            tmp_path / "failed.csv",
            10,
            progress=False,
        ) as job:
            summary = await job.run(asyncio.Event())
        assert (summary.complete, summary.outcomes["created"]) == (True, 2)
        # The archiver reads the trail the workers archived (created x5, revoked x1), and nothing else.
        archiver = await aio_pika.connect(url_as(node, name, "audit-archiver"))
        keys = await read_stream(await archiver.channel(), "sign_in_tokens.audit.archive", 6)
        assert sorted(set(keys)) == ["created.bulk", "created.interactive", "revoked.interactive"]
        await archiver.close()
    finally:
        await worker.shutdown()
