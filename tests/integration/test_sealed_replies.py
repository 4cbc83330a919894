"""Contract v3, sealed replies: a sealed caller's token crosses the broker as a box only its client opens.

Callers are real broker users (``caller_urls``): the portal's replies are sealed to its key, billing's
are not. The workers and the tests' own connections are guest, the service user here; a test
publishing as guest plays a forger who got the service's broker identity (or a copy of its replies),
which the box still keeps out.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import stat
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from nacl.public import PrivateKey
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.errors import ForbiddenError
from sign_in_tokens_client.contract.messages import Created, decode_reply
from sign_in_tokens_client.sealing import SealingError, encoded, generate_key_file, open_sealed, public_key_of, seal

from service.amqp.publisher import _AbsentMessageId
from service.local.fake_clerk import FakeClerk
from service.state.dedup import idempotency_key
from service.state.dedup._redis import RedisIdempotencyStore
from service.state.dedup.cipher import AnswerCipher, answers_key
from service.state.dedup.memory import MemoryIdempotencyStore
from tests.conftest import WorkerFactory, get_message, wait_depth, wait_until
from tests.instances import STAGING, STAGING_KEY
from tests.integration.test_bulk import finish, lines
from tests.integration.test_health import get
from tests.integration.test_instance_holds import instances_file
from tests.integration.test_policy import edit
from tests.integration.test_shared_idempotency import ANSWER
from tests.integration.test_trust import client_as, forged_reply, write_policy
from tests.workers import WorkerProcesses

SEALED_POLICY = """
[callers.support-portal]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to", "amq_*", "sign-in-tokens-bulk.*"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
reply_public_key = {portal}

[callers.billing]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to", "amq_*"]
"""


class Keys:
    """The service's key file and a caller's key pair, for one test."""

    def __init__(self, tmp_path: Path) -> None:
        self.service_file = tmp_path / "sealing.key"
        self.service_public = generate_key_file(self.service_file)
        private = PrivateKey.generate()
        self.portal = bytes(private)
        self.portal_public = bytes(private.public_key)

    def policy(self, tmp_path: Path, *portal_keys: bytes, extra: str = "") -> str:
        listed = [encoded(key) for key in portal_keys or (self.portal_public,)]
        written = json.dumps(listed[0] if len(listed) == 1 else listed)
        return write_policy(tmp_path, extra + SEALED_POLICY.format(portal=written))

    def portal_client(self, url: str, queue_names: dict[str, str], **options: Any) -> SignInTokenClient:
        options.setdefault("private_key", self.portal)
        options.setdefault("service_public_key", self.service_public)
        return client_as(url, queue_names, service_user="guest", **options)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def secrets_of(fake_clerk: FakeClerk) -> list[str]:
    """Every token and URL the stand-in Clerk made, of both kinds."""
    made = [*fake_clerk.stats.tokens.values(), *fake_clerk.actors.tokens.values()]
    return [value for obj in made for value in (obj["token"], obj["url"])]


def assert_no_secret(messages: list[AbstractIncomingMessage], fake_clerk: FakeClerk) -> None:
    """No token and no URL Clerk made is in any body or header of ``messages``, in any encoding a reader tries."""
    secrets = secrets_of(fake_clerk)
    assert secrets
    for message in messages:
        seen = message.body + repr(message.headers).encode()
        for secret in secrets:
            assert secret.encode() not in seen
            assert base64.b64encode(secret.encode())[:24] not in seen


async def replies_queue(channel: AbstractChannel) -> str:
    """A durable queue of the portal's (its policy allows ``amq_*``), read as an administrator would."""
    queue = f"amq_sealed_{uuid.uuid4().hex[:8]}"
    await channel.declare_queue(queue, durable=True)
    return queue


def bound_of(message: AbstractIncomingMessage, message_id: str | None) -> dict[str, Any]:
    """What a box in ``message`` must be bound to, read off the outer reply (and the request's message_id)."""
    reply = decode_reply(message.body, message.content_type)
    assert isinstance(reply, Created)
    token = reply.token_object
    headers = message.headers or {}
    return {
        "id": token.id,
        "user_id": token.user_id,
        "caller": headers["x-caller"],
        "correlation_id": message.correlation_id,
        "message_id": message_id,
        "instance": headers["x-clerk-instance"],
    }


async def publish_as(url: str, body: dict[str, Any], queue: str, *, absent_id: bool = False, **properties: Any) -> None:
    """Publish one request as the broker user of ``url`` (``absent_id``: no message_id, as amqplib can send one)."""
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(json.dumps(body).encode(), content_type="application/json", **properties)
        if not absent_id:
            await channel.default_exchange.publish(message, queue)
            return
        amqp_properties = message.properties  # a new object at each reading
        amqp_properties.message_id = _AbsentMessageId()  # aiormq would invent one
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(message.body, routing_key=queue, properties=amqp_properties)


async def test_a_sealed_callers_replies_hold_no_token_in_clear_and_its_client_opens_them(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """The reply queue and the dead-letter queue, read as an administrator would: boxes only; the client opens them."""
    await start_worker(policy_file=keys.policy(tmp_path), reply_sealing_key_file=str(keys.service_file))
    queue = await replies_queue(channel)
    portal_url = caller_urls["support-portal"]
    await publish_as(
        portal_url,
        {"user_id": "user_1"},
        queue_names["REQUEST_QUEUE"],
        reply_to=queue,
        correlation_id="c-1",
        message_id="m-1",
        user_id="support-portal",
    )
    message = await get_message(channel, queue)
    headers = message.headers or {}
    assert (headers["x-sealed"], headers["x-outcome"], headers["x-caller"]) == ("nacl-box", "created", "support-portal")
    body = json.loads(message.body)
    assert set(body["sign_in_token"]) == {"object", "id", "status", "user_id", "created_at", "updated_at", "sealed"}
    assert_no_secret([message], fake_clerk)
    made = fake_clerk.stats.tokens[body["sign_in_token"]["id"]]
    sealed = body["sign_in_token"]["sealed"]
    assert open_sealed(keys.portal, [keys.service_public], sealed, bound_of(message, "m-1")) == (
        made["token"],
        made["url"],
    )
    # A reply nobody can receive: the request is dead-lettered, its token revoked; nothing usable there either.
    await publish_as(
        portal_url,
        {"user_id": "user_2"},
        queue_names["REQUEST_QUEUE"],
        reply_to="amq_no_such_queue",
        user_id="support-portal",
    )
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert (dead.headers or {})["x-dead-letter-reason"] == "reply_refused"
    await wait_until(lambda: len(fake_clerk.stats.revoked) == 1, what="the refused reply's token revoked")
    assert_no_secret([message, dead], fake_clerk)
    # The client: ordinary tokens, of both kinds, and a revocation's answer.
    async with keys.portal_client(
        portal_url, queue_names, impersonation_queue=queue_names["IMPERSONATION_QUEUE"]
    ) as portal:
        token = await portal.create("user_3", timeout=10)
        actor = await portal.impersonate("user_4", actor_sub="user_agent_1", timeout=10)
        revoked = await portal.revoke(token.id, timeout=10)
    assert (token.token, token.url) == (
        fake_clerk.stats.tokens[token.id]["token"],
        fake_clerk.stats.tokens[token.id]["url"],
    )
    made_actor = fake_clerk.actors.tokens[actor.id]
    assert (actor.token, actor.url, actor.actor["sub"]) == (made_actor["token"], made_actor["url"], "user_agent_1")
    assert (revoked.id, revoked.status) == (token.id, "revoked")


async def test_a_box_for_another_key_tampered_with_or_moved_is_dropped_and_the_real_reply_taken(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    amqp: aio_pika.abc.AbstractRobustConnection,
    keys: Keys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Forgeries published as the service's own user, before Clerk answers: each dropped; the call gets its token."""
    await start_worker(policy_file=keys.policy(tmp_path), reply_sealing_key_file=str(keys.service_file))
    async with keys.portal_client(caller_urls["support-portal"], queue_names, replies="queue") as portal:
        earlier = await portal.create("user_1", timeout=10)  # a real box, to be moved into another reply
        fake_clerk.latency_seconds = 1.0
        call = asyncio.create_task(portal.create("user_1", timeout=10))
        await wait_until(lambda: fake_clerk.stats.create_calls == 2, what="the second request at Clerk")
        correlation_id, pending = next(iter(portal._pending.items()))
        service = _private(keys.service_file)
        bound = {
            "id": "sit_forged",
            "user_id": "user_1",
            "caller": "support-portal",
            "correlation_id": correlation_id,
            "message_id": pending.message_id,
            "instance": "default",
        }
        forger = bytes(PrivateKey.generate())
        other_caller = public_key_of(bytes(PrivateKey.generate()))
        forgeries = {
            "sealed by another key": seal(forger, keys.portal_public, "forged", "https://evil.example/1", bound),
            "sealed for another caller": seal(service, other_caller, "forged", "https://evil.example/2", bound),
            "bound to another reply": seal(
                service, keys.portal_public, "forged", "https://evil.example/3", {**bound, "correlation_id": "other"}
            ),
            "tampered with": _tampered(seal(service, keys.portal_public, "forged", "https://evil.example/4", bound)),
        }
        publisher = await amqp.channel()
        for sealed in forgeries.values():
            await publisher.default_exchange.publish(_sealed_reply(correlation_id, sealed), portal.reply_queue)
        # And a token in clear, the service's shape: a client holding a key never takes one (no downgrade).
        plain = forged_reply(correlation_id, "user_1")
        plain.headers, plain.user_id = {"x-outcome": "created", "x-caller": "support-portal"}, "guest"
        await publisher.default_exchange.publish(plain, portal.reply_queue)
        token = await asyncio.wait_for(call, 15)
    assert token.id in fake_clerk.stats.tokens
    assert token.id != earlier.id
    reasons = sorted(r.reason for r in caplog.records if r.getMessage() == "forged_reply_dropped")  # type: ignore[attr-defined]
    assert reasons == sorted(
        [
            "the box does not open with the service's keys",  # another key
            "the box does not open with the service's keys",  # another caller's
            "the box is bound to another reply",
            "the box does not open with the service's keys",  # tampered with
            "a token in clear (this client takes sealed replies only)",
        ]
    )
    assert (token.token, token.url) == (
        fake_clerk.stats.tokens[token.id]["token"],
        fake_clerk.stats.tokens[token.id]["url"],
    )
    assert "evil" not in (token.url or "")


def _private(path: Path) -> bytes:
    return base64.b64decode(path.read_text().strip())


def _tampered(sealed: str) -> str:
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _sealed_reply(correlation_id: str, sealed: str) -> aio_pika.Message:
    token = {
        "object": "sign_in_token",
        "id": "sit_forged",
        "user_id": "user_1",
        "status": "pending",
        "created_at": 1,
        "updated_at": 1,
        "sealed": sealed,
    }
    return aio_pika.Message(
        json.dumps({"outcome": "created", "sign_in_token": token}).encode(),
        content_type="application/json",
        correlation_id=correlation_id,
        user_id="guest",  # the service's broker user here: these forgeries pass that check
        headers={
            "x-outcome": "created",
            "x-caller": "support-portal",
            "x-sealed": "nacl-box",
            "x-clerk-instance": "default",
        },
    )


async def test_a_caller_without_a_key_gets_plain_replies_and_one_naming_a_key_it_has_not_is_refused(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Billing has no reply_public_key: its tokens come in clear; its client holding a key asks, and is refused."""
    await start_worker(policy_file=keys.policy(tmp_path), reply_sealing_key_file=str(keys.service_file))
    async with client_as(caller_urls["billing"], queue_names, service_user="guest") as billing:
        token = await billing.create("user_1", timeout=10)
    assert token.token == fake_clerk.stats.tokens[token.id]["token"]
    async with keys.portal_client(caller_urls["billing"], queue_names) as billing:
        with pytest.raises(ForbiddenError, match="reply_public_key"):
            await billing.create("user_2", timeout=10)
    # The portal naming a key that is not its own: refused before Clerk is called.
    stranger = bytes(PrivateKey.generate())
    async with keys.portal_client(caller_urls["support-portal"], queue_names, private_key=stranger) as portal:
        with pytest.raises(ForbiddenError, match="not one of caller 'support-portal'"):
            await portal.create("user_3", timeout=10)
    assert fake_clerk.stats.create_calls == 1


async def test_require_sealed_dead_letters_every_caller_without_a_key(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """``require_sealed = true``: billing's request is dead-lettered (forbidden_caller); the portal is served."""
    policy = keys.policy(tmp_path, extra="require_sealed = true\n")
    await start_worker(policy_file=policy, reply_sealing_key_file=str(keys.service_file))
    await publish_as(caller_urls["billing"], {"user_id": "user_1"}, queue_names["REQUEST_QUEUE"], user_id="billing")
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert (dead.headers or {})["x-dead-letter-reason"] == "forbidden_caller"
    async with keys.portal_client(caller_urls["support-portal"], queue_names) as portal:
        token = await portal.create("user_2", timeout=10)
    assert token.token == fake_clerk.stats.tokens[token.id]["token"]
    assert fake_clerk.stats.create_calls == 1


async def test_a_replayed_message_id_gets_a_new_box_of_the_same_token_and_the_store_holds_none_in_clear(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Two requests with one message_id: one call to Clerk, two different boxes opening to the same token."""
    worker = await start_worker(policy_file=keys.policy(tmp_path), reply_sealing_key_file=str(keys.service_file))
    queue = await replies_queue(channel)
    boxes = []
    for correlation_id in ("c-1", "c-2"):
        await publish_as(
            caller_urls["support-portal"],
            {"user_id": "user_1"},
            queue_names["REQUEST_QUEUE"],
            reply_to=queue,
            correlation_id=correlation_id,
            message_id="m-1",
            user_id="support-portal",
        )
        message = await get_message(channel, queue)
        boxes.append((json.loads(message.body)["sign_in_token"]["sealed"], bound_of(message, "m-1")))
    assert fake_clerk.stats.create_calls == 1
    assert boxes[0][0] != boxes[1][0]
    opened = {open_sealed(keys.portal, [keys.service_public], sealed, bound) for sealed, bound in boxes}
    (made,) = fake_clerk.stats.tokens.values()
    assert opened == {(made["token"], made["url"])}
    # The first box, moved into the second reply, is told apart.
    with pytest.raises(SealingError, match="bound to another reply"):
        open_sealed(keys.portal, [keys.service_public], boxes[0][0], boxes[1][1])
    store = worker.dedup
    assert isinstance(store, MemoryIdempotencyStore)
    (entry,) = store.replies.values()
    assert made["token"].encode() not in entry.packed
    assert made["token"].split(".")[-1].encode() not in entry.packed


async def test_answers_kept_in_redis_hold_no_token_and_survive_a_roll_of_the_worker_key(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    redis_url: str,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Redis holds every answer encrypted; after the worker's key rolls (new key first, SIGHUP) a replay still opens."""
    worker = await start_worker(
        policy_file=keys.policy(tmp_path), reply_sealing_key_file=str(keys.service_file), redis_url=redis_url
    )
    new_file = tmp_path / "new.key"
    new_public = generate_key_file(new_file)
    # During the roll the client accepts both of the service's keys.
    async with keys.portal_client(
        caller_urls["support-portal"], queue_names, service_public_key=[keys.service_public, new_public]
    ) as portal:
        first = await portal.create("user_1", timeout=10, message_id="m-1")
        client = aioredis.from_url(redis_url)
        values = [await client.hgetall(key) for key in await client.keys("*") if await client.type(key) == b"hash"]
        stored = b"".join(v for fields in values for v in fields.values())
        await client.aclose()
        assert stored, "the answer is in Redis"
        assert first.token.encode() not in stored
        assert first.token.split(".")[-1].encode() not in stored
        keys.service_file.write_text(new_file.read_text() + keys.service_file.read_text())
        worker.reload()
        assert worker.sealing.public_key == new_public
        replayed = await portal.create("user_1", timeout=10, message_id="m-1")
        fresh = await portal.create("user_2", timeout=10)
    assert (replayed.id, replayed.token) == (first.id, first.token)
    assert fresh.token == fake_clerk.stats.tokens[fresh.id]["token"]
    assert fake_clerk.stats.create_calls == 2


async def test_a_callers_key_rolls_without_a_failed_request(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """The policy lists the old and the new key: clients holding either are served; then the old one is dropped."""
    new = PrivateKey.generate()
    policy = keys.policy(tmp_path, keys.portal_public, bytes(new.public_key))
    worker = await start_worker(policy_file=policy, reply_sealing_key_file=str(keys.service_file))
    url = caller_urls["support-portal"]
    async with (
        keys.portal_client(url, queue_names) as old_client,
        keys.portal_client(url, queue_names, private_key=bytes(new)) as new_client,
    ):
        tokens = [await old_client.create("user_1", timeout=10), await new_client.create("user_2", timeout=10)]
        edit(
            policy,
            json.dumps([encoded(keys.portal_public), encoded(bytes(new.public_key))]),
            json.dumps(encoded(bytes(new.public_key))),
        )
        assert worker.reload_policy()
        tokens.append(await new_client.create("user_3", timeout=10))
        with pytest.raises(ForbiddenError):
            await old_client.create("user_4", timeout=10)
    assert [t.token for t in tokens] == [fake_clerk.stats.tokens[t.id]["token"] for t in tokens]


async def test_the_bulk_tool_opens_sealed_replies_into_its_file(
    worker_processes: WorkerProcesses,
    caller_urls: dict[str, str],
    fake_clerk: FakeClerk,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """``bulk --private-key-file F --service-public-key K``: the file holds the opened tokens (mode 0600)."""
    await worker_processes.start(
        POLICY_FILE=keys.policy(tmp_path), REPLY_SEALING_KEY_FILE=str(keys.service_file), SERVICE_USER="guest"
    )
    private = tmp_path / "portal.key"
    private.write_text(encoded(keys.portal) + "\n")
    source = tmp_path / "users.csv"
    source.write_text("user_id\nuser_1\nuser_2\nuser_3\n")
    output = tmp_path / "tokens.jsonl"
    portal = {"AMQP_URL": caller_urls["support-portal"], "SERVICE_USER": "guest"}
    sealed = ("--private-key-file", str(private), "--service-public-key", encoded(keys.service_public))
    code, said = await finish(worker_processes, str(source), "-o", str(output), *sealed, **portal)
    assert code == 0, said
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    tokens = [entry["sign_in_token"] for entry in lines(output)]
    assert len(tokens) == 3
    for token in tokens:
        made = fake_clerk.stats.tokens[token["id"]]  # type: ignore[index]
        assert (token["token"], token["url"]) == (made["token"], made["url"])  # type: ignore[index]
        assert "sealed" not in token  # type: ignore[operator]
    # Without the keys the tool says what is wrong, in one line.
    code, said = await finish(
        worker_processes, str(source), "-o", str(tmp_path / "x.jsonl"), "--private-key-file", str(private), **portal
    )
    assert code == 2
    assert said.strip() == "sign-in-tokens: --private-key-file and --service-public-key go together (sealed replies)"
    # A run without them: each sealed reply is a failed row (no token to write), in the failures file.
    unopened = tmp_path / "unopened.jsonl"
    code, said = await finish(worker_processes, str(source), "-o", str(unopened), **portal)
    assert [entry["error"]["code"] for entry in lines(unopened)] == ["sealed_reply"] * 3  # type: ignore[index]
    assert (tmp_path / "unopened.jsonl.failed.csv").read_text().splitlines() == [
        "user_id,expires_in_seconds,org_id",
        "user_1,,",
        "user_2,,",
        "user_3,,",
    ]


async def test_sighup_rolls_the_workers_key_and_a_bad_file_keeps_the_one_in_force(
    worker_processes: WorkerProcesses,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """The roll as docs/security.md tells it: clients take both keys, the file gets the new one first, SIGHUP."""
    worker = await worker_processes.start(
        POLICY_FILE=keys.policy(tmp_path), REPLY_SEALING_KEY_FILE=str(keys.service_file), SERVICE_USER="guest"
    )
    new_file = tmp_path / "new.key"
    new_public = generate_key_file(new_file)
    url = caller_urls["support-portal"]
    both = [keys.service_public, new_public]
    async with keys.portal_client(url, queue_names, service_public_key=both) as rolling:
        tokens = [await rolling.create("user_1", timeout=10)]
        keys.service_file.write_text(new_file.read_text() + keys.service_file.read_text())
        worker.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "sealing_key_reloaded" in worker_processes.logs(), what="the new key read")
        assert encoded(new_public) in worker_processes.logs()
        tokens.append(await rolling.create("user_2", timeout=10))
    keys.service_file.write_text("not a key\n")
    worker.process.send_signal(signal.SIGHUP)
    await wait_until(lambda: "sealing_key_reload_failed" in worker_processes.logs(), what="the bad file refused")
    async with keys.portal_client(url, queue_names, service_public_key=new_public) as rolled:
        tokens.append(await rolled.create("user_3", timeout=10))
    assert [t.token for t in tokens] == [fake_clerk.stats.tokens[t.id]["token"] for t in tokens]
    assert "not a key" not in worker_processes.logs()


async def test_a_revocations_answer_in_clear_is_dropped_by_a_sealed_client(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    amqp: aio_pika.abc.AbstractRobustConnection,
    keys: Keys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    redis_url: str,
) -> None:
    """A forger's "revoked" in clear would leave a live token believed dead: dropped; Clerk's revocation taken."""
    # Redis keeps who got the token (the grant) while the worker is away.
    settings = {
        "policy_file": keys.policy(tmp_path),
        "reply_sealing_key_file": str(keys.service_file),
        "redis_url": redis_url,
    }
    worker = await start_worker(**settings)
    async with keys.portal_client(caller_urls["support-portal"], queue_names, replies="queue") as portal:
        token = await portal.create("user_1", timeout=10)
        await worker.shutdown()  # the revocation waits in its queue: the forger answers first
        call = asyncio.create_task(portal.revoke(token.id, timeout=15))
        await wait_until(lambda: bool(portal._pending), what="the revocation sent")
        correlation_id = next(iter(portal._pending))
        body = json.loads(forged_reply(correlation_id, "user_1").body)
        body["outcome"], body["sign_in_token"]["id"], body["sign_in_token"]["status"] = "revoked", token.id, "revoked"
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            user_id="guest",
            headers={"x-outcome": "revoked", "x-caller": "support-portal"},
        )
        await (await amqp.channel()).default_exchange.publish(message, portal.reply_queue)
        await wait_until(
            lambda: any(r.getMessage() == "forged_reply_dropped" for r in caplog.records), what="the forgery dropped"
        )
        assert not call.done()
        await start_worker(**settings)
        revoked = await asyncio.wait_for(call, 15)
    assert (revoked.id, revoked.status) == (token.id, "revoked")
    assert fake_clerk.stats.revoked == {token.id}  # the answer taken is the one after Clerk's revocation


@pytest.mark.parametrize("old_replica_keys", ["the old key", "no key yet"])
async def test_a_replica_that_cannot_open_a_stored_answer_gives_the_request_to_one_that_can(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    redis_url: str,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    old_replica_keys: str,
) -> None:
    """A rollout: the answer stored under the new key; the retry reaches a replica without it first: same token."""
    new_file = tmp_path / "new.key"
    new_public = generate_key_file(new_file)
    rolled = tmp_path / "rolled.key"
    rolled.write_text(new_file.read_text() + keys.service_file.read_text())
    policy = keys.policy(tmp_path)
    if old_replica_keys == "no key yet":  # the key added to a fleet: a caller without reply_public_key
        edit(policy, f"reply_public_key = {json.dumps(encoded(keys.portal_public))}\n", "")
    updated = await start_worker(policy_file=policy, reply_sealing_key_file=str(rolled), redis_url=redis_url)
    both = [keys.service_public, new_public]
    sealed = old_replica_keys == "the old key"
    url = caller_urls["support-portal"]
    client = (
        keys.portal_client(url, queue_names, service_public_key=both)
        if sealed
        else client_as(url, queue_names, service_user="guest")
    )
    async with client:
        first = await client.create("user_1", timeout=10, message_id="m-roll")
        await updated.shutdown()
        old = {"reply_sealing_key_file": str(keys.service_file)} if sealed else {}
        await start_worker(policy_file=policy, redis_url=redis_url, **old)
        retry = asyncio.create_task(client.create("user_1", timeout=20, message_id="m-roll"))
        said = ""

        def given_back() -> bool:
            nonlocal said
            said += capsys.readouterr().out
            return "idempotency_answer_unreadable" in said

        await wait_until(given_back, what="the old replica giving the request back")
        await start_worker(policy_file=policy, reply_sealing_key_file=str(rolled), redis_url=redis_url)
        again = await asyncio.wait_for(retry, 25)
    assert (again.id, again.token) == (first.id, first.token)
    assert fake_clerk.stats.create_calls == 1


async def test_a_held_request_is_sealed_to_the_message_id_it_was_sent_with_or_none(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """A held request without message_id stays without one; a caller's own x-no-message-id header changes nothing."""
    policy = keys.policy(tmp_path)
    key_line = f"reply_public_key = {json.dumps(encoded(keys.portal_public))}\n"
    edit(policy, key_line, f'instances = ["prod", "staging"]\ndefault_instance = "prod"\n{key_line}')
    instances = instances_file(tmp_path, fake_clerk)
    worker = await start_worker(
        policy_file=policy, reply_sealing_key_file=str(keys.service_file), clerk_instances_file=instances
    )
    queue = await replies_queue(channel)
    fake_clerk.accepted_keys.discard(STAGING_KEY)
    sent = {"c-none": None, "c-forged-header": "m-kept"}
    for correlation_id, message_id in sent.items():
        await publish_as(
            caller_urls["support-portal"],
            {"user_id": "user_1"},
            queue_names["REQUEST_QUEUE"],
            reply_to=queue,
            correlation_id=correlation_id,
            user_id="support-portal",
            headers={**STAGING, "x-no-message-id": True},  # only the worker's copies may say so
            absent_id=message_id is None,
            **({"message_id": message_id} if message_id else {}),
        )
    await wait_until(lambda: not worker.parts.upstreams["staging"].key_ok, what="staging's key rejected")
    await wait_depth(channel, f"{queue_names['HOLD_QUEUE_PREFIX']}.staging", 2)
    fake_clerk.accepted_keys.add(STAGING_KEY)
    for _ in sent:
        message = await get_message(channel, queue, timeout=20)
        sealed = json.loads(message.body)["sign_in_token"]["sealed"]
        made = fake_clerk.stats.tokens[json.loads(message.body)["sign_in_token"]["id"]]
        bound = bound_of(message, sent[message.correlation_id or ""])
        assert open_sealed(keys.portal, [keys.service_public], sealed, bound) == (made["token"], made["url"])


async def test_an_unsettled_answer_no_replica_can_open_is_counted_when_it_is_dead_lettered(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    channel: AbstractChannel,
    redis_url: str,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Stored under a key no worker here has, its reply's fate unknown: never a second token, and not silent."""
    cipher = AnswerCipher([answers_key(bytes(PrivateKey.generate()))])
    holder = RedisIdempotencyStore(redis_url, 600, 5.0, cipher=lambda: cipher)
    async with holder.claim(idempotency_key("support-portal", "m-lost", "unused")) as claim:
        await claim.remember(b'{"user_id":"user_1"}', ANSWER, 60)  # its holder stopped before its reply's fate
    await holder.close()
    worker = await start_worker(
        policy_file=keys.policy(tmp_path),
        reply_sealing_key_file=str(keys.service_file),
        redis_url=redis_url,
        delivery_limit=1,
    )
    await publish_as(
        caller_urls["support-portal"],
        {"user_id": "user_1"},
        queue_names["REQUEST_QUEUE"],
        message_id="m-lost",
        user_id="support-portal",
        reply_to="amq.rabbitmq.reply-to.nobody",  # allowed; never reached: no answer is read
    )
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"], timeout=20)
    assert (dead.headers or {})["x-death"][0]["reason"] == "delivery_limit"
    _, _, metrics = await get(worker, "/metrics")
    assert 'sign_in_tokens_unsettled_tokens_total{reason="answer_unreadable"} 1.0' in metrics
    assert fake_clerk.stats.create_calls == 0
