"""The leak scan: a whole session with debug logging, then every place a secret could leak, searched.

A second session does the same for a sealed caller (contract v3), and searches its replies, read off
the broker as an administrator would, and Redis, too.

The session runs a worker process through success (JSON and MessagePack, both lanes, an actor
token), every error code (a spent impersonation allowance among them), retries, a rejected key and its recovery, a reply nobody can receive (the token revoked), a
token Clerk answered malformed (revoked), an actor token nobody can receive (revoked), a refused reply_to and an undecodable request (dead
letters). Then its log, its metrics, every audit event and every dead-lettered message are searched
for every token, token URL and key value the session produced. None may be found.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import aiohttp
import msgspec
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel
from nacl.public import PrivateKey
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import Created, Failed
from sign_in_tokens_client.sealing import encoded, generate_key_file

from service.local.fake_clerk import FakeClerk, Fault
from tests.conftest import SECRET_KEY, queue_depth, wait_depth, wait_until
from tests.workers import WorkerProcesses

POLICY = """
protected_users = ["user_admin_*"]

[defaults]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 3600
allow_org_id = true
reply_to = ["{prefix}.*", "amq_*", "no.such.queue"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
"""


async def drain(channel: AbstractChannel, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in ``queue``."""
    found = []
    declared = await channel.declare_queue(queue, passive=True)
    while (message := await declared.get(no_ack=True, fail=False)) is not None:
        found.append(message)
    return found


async def audit_everything(
    channel: AbstractChannel, queue_names: dict[str, str]
) -> tuple[str, aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]:
    """The test's queue prefix, its audit exchange, and a queue bound to every event of it."""
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    exchange = await channel.declare_exchange(f"{prefix}.audit", aio_pika.ExchangeType.TOPIC, durable=True)
    audit = await channel.declare_queue(f"{prefix}.audit-all", exclusive=True)
    await audit.bind(exchange, "#")
    return prefix, exchange, audit


def as_text(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    """A message's body, properties and headers as one text to search."""
    info = {k: v for k, v in message.info().items() if k != "body"}
    body = message.body.decode("utf-8", "backslashreplace")
    return f"{body}\n{msgspec.json.encode(info, enc_hook=repr).decode()}"


async def test_a_full_session_leaves_no_token_url_or_key_anywhere_but_the_replies(  # noqa: PLR0915 - one session, in order
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    client: SignInTokenClient,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    tmp_path: Path,
) -> None:
    prefix, exchange, audit = await audit_everything(channel, queue_names)
    audit_exchange = exchange.name
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.replace("{prefix}", prefix))
    worker = await worker_processes.start(
        LOG_LEVEL="debug",
        POLICY_FILE=str(policy),
        AUDIT_EXCHANGE=audit_exchange,
        RETRY_BASE_SECONDS="0.01",
        RETRY_MAX_DELAY_SECONDS="0.2",
        PROBE_MAX_INTERVAL_SECONDS="0.2",
        MAX_ATTEMPTS="3",
    )
    outcomes: list[str] = []

    async def ask(body: bytes, **send: object) -> None:
        reply = (await (await client.send(body, **send))).decode()  # type: ignore[arg-type]
        outcomes.append("created" if isinstance(reply, Created) else reply.error.code)
        assert isinstance(reply, Created | Failed)

    # Success, both lanes, both encodings.
    await ask(b'{"user_id": "user_a"}')
    await ask(b'{"userId": "user_b", "expiresInSeconds": 60}', lane=Lane.BULK)
    await ask(msgspec.msgpack.encode({"user_id": "user_c"}), content_type="application/msgpack")
    # An actor token, and a spent allowance (402).
    actor = await client.impersonate("user_n", actor_sub="user_agent_1")
    fake_clerk.actors.impersonations_left = 0
    await ask(b'{"user_id": "user_o", "actor": {"sub": "user_agent_1"}}', queue=queue_names["IMPERSONATION_QUEUE"])
    fake_clerk.actors.impersonations_left = None
    # Every error code.
    await ask(b'{"user_id": "user_d", "expires_in_second": 60}')  # invalid_request
    await ask(b'{"user_id": "user_admin_1"}')  # forbidden
    await ask(b'{"user_id": "user_e"}', deadline_ms=int(time.time() * 1000) - 1)  # deadline_exceeded
    await ask(b'{"user_id": "nobody"}')  # user_not_found
    await ask(b'{"user_id": "user_f", "org_id": "not_an_org"}')  # upstream_rejected
    fake_clerk.faults.extend([Fault(429), Fault(429), Fault(429)] * 3)
    await ask(b'{"user_id": "user_g"}')  # rate_limited (429s beyond the retries)
    fake_clerk.faults.clear()
    fake_clerk.faults.extend([Fault(503)] * 3)
    await ask(b'{"user_id": "user_h"}')  # upstream_unavailable
    # Retries that succeed.
    fake_clerk.faults.extend([Fault(503), Fault(500, drop_connection=True)])
    await ask(b'{"user_id": "user_i"}')
    # A rejected key: the worker pauses, probes, and answers once the key works again.
    fake_clerk.accepted_keys = {"sk_test_someone_elses"}
    pending = await client.send(b'{"user_id": "user_j"}')
    await wait_until(lambda: "secret_key_rejected" in worker_processes.logs(), what="the key rejected")
    fake_clerk.accepted_keys = {SECRET_KEY}
    assert (await pending).headers["x-outcome"] == "created"
    # Clerk answers 200 with a body that is not a token: the token it made is revoked.
    fake_clerk.malformed_next = 1
    await ask(b'{"user_id": "user_k"}')
    # A reply nobody can receive: created, revoked, dead-lettered.
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_l"}', reply_to="no.such.queue", user_id="guest"),
        queue_names["REQUEST_QUEUE"],
    )
    await channel.default_exchange.publish(
        aio_pika.Message(
            b'{"user_id": "user_p", "actor": {"sub": "user_agent_1"}}', reply_to="no.such.queue", user_id="guest"
        ),
        queue_names["IMPERSONATION_QUEUE"],
    )
    # A reply_to outside the policy, and an undecodable request without reply_to: dead letters.
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_m"}', reply_to="amq.gen-elsewhere", user_id="guest"),
        queue_names["REQUEST_QUEUE"],
    )
    await channel.default_exchange.publish(
        aio_pika.Message(b"\x00 junk", user_id="guest"), queue_names["REQUEST_QUEUE"]
    )
    await wait_until(lambda: len(fake_clerk.stats.revoked) == 2, what="two tokens revoked")
    await wait_until(lambda: len(fake_clerk.actors.revoked) == 1, what="the undeliverable actor token revoked")

    deadline = time.monotonic() + 10
    while await queue_depth(channel, queue_names["DEAD_LETTER_QUEUE"]) < 4:
        assert time.monotonic() < deadline, "four dead letters within 10 s"
        await asyncio.sleep(0.05)  # wait-ok: the poll interval of a condition wait
    assert {"created", "invalid_request", "forbidden", "deadline_exceeded", "user_not_found"} <= set(outcomes)
    assert {"upstream_rejected", "rate_limited", "upstream_unavailable"} <= set(outcomes)

    # The search.
    secrets = {SECRET_KEY}
    for token in [*fake_clerk.stats.tokens.values(), *fake_clerk.actors.tokens.values()]:
        secrets |= {token["token"], token["url"], token["token"].split(".")[2]}
    assert len(fake_clerk.stats.tokens) == 7  # users a, b, c, i, j, k, l
    assert set(fake_clerk.actors.tokens) == {actor.id, *fake_clerk.actors.revoked}  # users n and p
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{worker.port}/metrics") as response:
        metrics = await response.text()
    assert await worker_processes.stop(worker, sig=signal.SIGTERM) == 0
    places = {
        "log": worker_processes.logs(),
        "metrics": metrics,
        "audit events": "\n".join(as_text(m) for m in await drain(channel, audit.name)),
        "dead letters": "\n".join(as_text(m) for m in await drain(channel, queue_names["DEAD_LETTER_QUEUE"])),
    }
    assert places["audit events"].count('"event":') >= 15
    # What was searched holds the session: a line for each reply, the revocations, the key's rejection.
    assert places["log"].count('"event":"replied"') == 15
    assert places["log"].count('"event":"token_revoked"') == 3
    assert "sign_in_tokens_revoked_total 3.0" in places["metrics"]
    found = {place: [s[:12] for s in secrets if s in text] for place, text in places.items()}
    assert found == {place: [] for place in places}
    await exchange.delete()


SECRETS = {
    "AMQP_URL": ("amqps://svc:amqp-s3cret@rabbit:5671/?cafile={ca}", "amqp-s3cret"),
    "REDIS_URL": ("rediss://redis:6380/0?password=redis-s3cret&ssl_password=k3y-s3cret", "redis-s3cret"),
    "CLERK_API_URL": ("https://proxy:clerk-s3cret@clerk-proxy.internal/v1?token=t0k3n-s3cret", "t0k3n-s3cret"),
}


def run_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``sign-in-tokens ARGS``, to its end."""
    return subprocess.run(  # noqa: S603 - our own module
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_config_and_bad_tls_files_print_no_credential(tmp_path: Path) -> None:
    """`config` with a credential in every URL and the key, then each URL refused for a bad TLS setting: none shown."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "REDIS_", "CLERK_"))}
    env |= {name: url.format(ca=ca) for name, (url, _) in SECRETS.items()}
    env["CLERK_SECRET_KEY"] = "sk_live_" + "q" * 40
    secrets = {"amqp-s3cret", "redis-s3cret", "k3y-s3cret", "clerk-s3cret", "t0k3n-s3cret", "q" * 40}
    shown = run_command("config", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "AMQP_URL=amqps://svc:********@rabbit:5671/" in shown.stdout
    bad = {
        "AMQP_URL": f"amqps://svc:amqp-s3cret@rabbit:5671/?cafile={tmp_path / 'missing.pem'}",
        "REDIS_URL": "rediss://:redis-s3cret@redis:6380/0?ssl_keyfile=/no/such.key&password=redis-s3cret",
        "CLERK_API_URL": "https://proxy:clerk-s3cret@clerk-proxy.internal/v1?no_verify_ssl=true&token=t0k3n-s3cret",
    }
    errors = []
    for name, url in bad.items():
        refused = run_command("config", env={**env, name: url})
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith(f"sign-in-tokens: configuration error: {name}: ")
        errors.append(refused.stderr)
    found = [secret for secret in secrets if any(secret in text for text in (shown.stdout, shown.stderr, *errors))]
    assert found == []


def test_config_lists_the_clerk_instances_with_every_key_masked(tmp_path: Path) -> None:
    """`config` with CLERK_INSTANCES_FILE: each instance, its limit and state shown; neither key, nor a key file's."""
    key_file = tmp_path / "staging.key"
    key_file.write_text("sk_test_" + "f" * 40)
    instances = tmp_path / "instances.toml"
    instances.write_text(
        f'[instances.prod]\nsecret_key = "sk_live_{"z" * 40}"\n'
        f'[instances.staging]\nsecret_key_file = "{key_file}"\nrate_limit = 50\nstate_id = "stg"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "REDIS_", "CLERK_"))}
    shown = run_command("config", env={**env, "CLERK_INSTANCES_FILE": str(instances)})
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.startswith("#   ")]
    assert lines == [
        "#   prod: key sk_live_********, https://api.clerk.com/v1, 1000 calls in 10 s, state prod",
        "#   staging: key sk_test_********, https://api.clerk.com/v1, 50 calls in 10 s, state stg",
    ]
    assert "z" * 40 not in shown.stdout + shown.stderr
    assert "f" * 40 not in shown.stdout + shown.stderr


async def redis_value(redis: aioredis.Redis, key: bytes) -> object:
    """What Redis holds under ``key``, as a reader gets it (a DUMP compresses long strings)."""
    kind = await redis.type(key)
    if kind == b"hash":
        return await redis.hgetall(key)
    if kind == b"string":
        return await redis.get(key)
    if kind == b"zset":
        return await redis.zrange(key, 0, -1, withscores=True)
    return await redis.dump(key)


SEALED_POLICY = """
[defaults]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 3600
reply_to = ["amq_*", "no.such.queue"]
impersonate = ["user_*"]
actors = ["user_agent_*"]
reply_public_key = "{caller}"
"""


async def test_a_sealed_callers_session_leaves_no_token_anywhere_on_the_broker_or_in_redis(
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    amqp_url: str,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Sealed replies, read as an administrator would, beside the log, metrics, audit, dead letters and Redis."""
    prefix, exchange, audit = await audit_everything(channel, queue_names)
    audit_exchange = exchange.name
    service_key = tmp_path / "sealing.key"
    service_public = generate_key_file(service_key)
    caller = PrivateKey.generate()
    policy = tmp_path / "policy.toml"
    policy.write_text(SEALED_POLICY.replace("{caller}", encoded(bytes(caller.public_key))))
    worker = await worker_processes.start(
        LOG_LEVEL="debug",
        POLICY_FILE=str(policy),
        AUDIT_EXCHANGE=audit_exchange,
        REDIS_URL=redis_url,
        REPLY_SEALING_KEY_FILE=str(service_key),
    )
    # Replies left in a queue of the caller's, as a broker administrator finds them.
    replies = f"amq_leak_{prefix}"
    await channel.declare_queue(replies, durable=True)
    requests = [
        (queue_names["REQUEST_QUEUE"], b'{"user_id": "user_a"}', "m-a", "application/json"),
        (queue_names["BULK_QUEUE"], msgspec.msgpack.encode({"user_id": "user_b"}), "m-b", "application/msgpack"),
        (queue_names["REQUEST_QUEUE"], b'{"user_id": "user_a"}', "m-a", "application/json"),  # replayed
        (queue_names["IMPERSONATION_QUEUE"], b'{"user_id": "user_c", "actor": {"sub": "user_agent_1"}}', "m-c", None),
    ]
    for queue, body, message_id, content_type in requests:
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=replies, message_id=message_id, content_type=content_type, user_id="guest"),
            queue,
        )
    # A reply nobody can receive: its token revoked, its request dead-lettered.
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_d"}', reply_to="no.such.queue", user_id="guest"),
        queue_names["REQUEST_QUEUE"],
    )
    await wait_until(lambda: len(fake_clerk.stats.revoked) == 1, what="the refused reply's token revoked")
    # The client opens them; a revocation's answer is sealed too.
    async with SignInTokenClient(
        amqp_url,
        request_queue=queue_names["REQUEST_QUEUE"],
        revoke_queue=queue_names["REVOKE_QUEUE"],
        replies="queue",
        reply_queue_prefix="amq_",
        service_user="guest",
        private_key=bytes(caller),
        service_public_key=service_public,
    ) as sealed:
        token = await sealed.create("user_e", timeout=10)
        await sealed.revoke(token.id, timeout=10)
    assert token.token == fake_clerk.stats.tokens[token.id]["token"]
    await wait_depth(channel, replies, 4)
    await wait_depth(channel, queue_names["DEAD_LETTER_QUEUE"], 1)

    secrets = {bytes(caller).hex(), encoded(bytes(caller)), service_key.read_text().strip()}
    for made in [*fake_clerk.stats.tokens.values(), *fake_clerk.actors.tokens.values()]:
        secrets |= {made["token"], made["url"], made["token"].split(".")[2]}
    assert len(fake_clerk.stats.tokens) == 4  # users a, b, d, e: the replay made none
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{worker.port}/metrics") as response:
        metrics = await response.text()
    redis = aioredis.from_url(redis_url)
    stored = [f"{key!r} {await redis_value(redis, key)!r}" for key in await redis.keys("*")]
    await redis.aclose()
    assert await worker_processes.stop(worker, sig=signal.SIGTERM) == 0
    sealed_replies = await drain(channel, replies)
    places = {
        "log": worker_processes.logs(),
        "metrics": metrics,
        "replies": "\n".join(as_text(m) for m in sealed_replies),
        "audit events": "\n".join(as_text(m) for m in await drain(channel, audit.name)),
        "dead letters": "\n".join(as_text(m) for m in await drain(channel, queue_names["DEAD_LETTER_QUEUE"])),
        "redis": "\n".join(stored),
    }
    assert [(m.headers or {}).get("x-sealed") for m in sealed_replies] == ["nacl-box"] * 4
    assert places["redis"].count("sign_in_tokens") >= 3
    found = {place: [s[:12] for s in secrets if s in text] for place, text in places.items()}
    assert found == {place: [] for place in places}
    await exchange.delete()
    await channel.queue_delete(replies)
