"""A Node.js caller (amqplib, @msgpack/msgpack) gets its tokens: camelCase, direct reply-to, x-deadline, charsets.

And an actor token, asked for in camelCase on IMPERSONATION_QUEUE.

Its packages are installed by scripts/setup (``npm ci``) when ``node`` is on the machine; without
``node`` or without them, the test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from nacl.public import PrivateKey
from sign_in_tokens_client.connection import broker_user
from sign_in_tokens_client.sealing import encoded, generate_key_file

from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, get_message

NODE_DIR = Path(__file__).parents[1] / "interop" / "node"


POLICY = """
[defaults]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to"]
impersonate = ["user_*"]
actors = ["user_*_agent"]
"""


async def run_node_caller(amqp_url: str, queue_names: dict[str, str], **env: str) -> dict[str, dict[str, Any]]:
    """Run client.mjs to its end, every request answered; its replies by correlation id."""
    code, replies, stderr = await node_caller(amqp_url, queue_names, **env)
    assert code == 0, stderr
    return replies


async def node_caller(
    amqp_url: str, queue_names: dict[str, str], **env: str
) -> tuple[int | None, dict[str, dict[str, Any]], str]:
    """Run client.mjs to its end (skipped without Node.js or its packages): its exit code, replies and stderr."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js interoperability test needs Node.js 20")
    if not (NODE_DIR / "node_modules" / "tweetnacl").is_dir():
        pytest.skip(
            f"the Node.js packages are not installed in {NODE_DIR}: run scripts/setup (npm ci) with node present"
        )
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "client.mjs"),
        env={
            "AMQP_URL": amqp_url,
            "REQUEST_QUEUE": queue_names["REQUEST_QUEUE"],
            "IMPERSONATION_QUEUE": queue_names["IMPERSONATION_QUEUE"],
            "SERVICE_USER": broker_user(amqp_url),
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=NODE_DIR,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    replies = {r["correlationId"]: r for r in map(json.loads, stdout.decode().splitlines())}
    return process.returncode, replies, stderr.decode()


async def test_a_nodejs_caller_gets_its_tokens(
    start_worker: WorkerFactory, amqp_url: str, queue_names: dict[str, str], fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    await start_worker(policy_file=str(policy))
    replies = await run_node_caller(amqp_url, queue_names)
    assert set(replies) == {"ts-json", "ts-json-caps", "ts-msgpack", "ts-latin1", "ts-impersonate"}
    for name, user in (
        ("ts-json", "user_ts_json"),
        ("ts-json-caps", "user_ts_caps"),
        ("ts-msgpack", "user_ts_msgpack"),
    ):
        reply = replies[name]
        assert reply["outcome"] == "created", reply
        assert reply["body"]["sign_in_token"]["user_id"] == user
    assert replies["ts-msgpack"]["contentType"] == "application/msgpack"
    assert replies["ts-json"]["contentType"] == "application/json"
    latin1 = replies["ts-latin1"]["body"]["error"]
    assert (latin1["code"], latin1["message"]) == (
        "invalid_request",
        "content_type charset 'iso-8859-1' is not supported; send UTF-8 (charset=utf-8) or no charset",
    )
    assert fake_clerk.stats.create_calls == 3
    actor = replies["ts-impersonate"]
    assert actor["outcome"] == "created", actor
    assert (actor["body"]["actor_token"]["user_id"], actor["body"]["actor_token"]["actor"]) == (
        "user_ts_customer",
        {"sub": "user_ts_agent"},
    )
    assert fake_clerk.actors.last_params is not None
    assert fake_clerk.actors.last_params["session_max_duration_in_seconds"] == 600


def sealed_caller(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A worker's settings sealing the Node.js caller's replies (POLICY and its key), and the caller's keys."""
    service_key = tmp_path / "sealing.key"
    service_public = generate_key_file(service_key)
    caller = PrivateKey.generate()
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY + f'reply_public_key = "{encoded(bytes(caller.public_key))}"\n')
    settings = {"policy_file": str(policy), "reply_sealing_key_file": str(service_key)}
    # Two service keys, as while the service's key rolls: the one in force second (and a stray comma).
    rolling = f"{encoded(bytes(PrivateKey.generate().public_key))}, {encoded(service_public)},"
    return settings, {"REPLY_PRIVATE_KEY": encoded(bytes(caller)), "SERVICE_PUBLIC_KEY": rolling}


async def test_a_nodejs_caller_opens_its_sealed_replies_with_tweetnacl(
    start_worker: WorkerFactory, amqp_url: str, queue_names: dict[str, str], fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    """Its replies sealed to its key (policy), opened in Node.js: the tokens Clerk made, of both kinds."""
    settings, keys = sealed_caller(tmp_path)
    await start_worker(**settings)
    replies = await run_node_caller(amqp_url, queue_names, **keys)
    for name, kind, made in (
        ("ts-json", "sign_in_token", fake_clerk.stats.tokens),
        ("ts-msgpack", "sign_in_token", fake_clerk.stats.tokens),
        ("ts-impersonate", "actor_token", fake_clerk.actors.tokens),
    ):
        reply = replies[name]
        assert (reply["outcome"], reply["sealed"]) == ("created", "nacl-box"), reply
        token = reply["body"][kind]
        assert (token["token"], token["url"]) == (made[token["id"]]["token"], made[token["id"]]["url"])
    assert replies["ts-latin1"]["sealed"] is None  # a failure carries no token: nothing to seal


async def test_a_sealed_nodejs_caller_drops_forged_replies_and_does_not_crash(
    start_worker: WorkerFactory,
    amqp_url: str,
    queue_names: dict[str, str],
    channel: AbstractChannel,
    tmp_path: Path,
) -> None:
    """Only forgers answer (as the service's broker user): a short box, an unknown token field, a token in clear."""
    settings, keys = sealed_caller(tmp_path)
    worker = await start_worker(**settings)
    await worker.shutdown()  # its queues stay: the requests wait there, and only the forgers answer
    node = asyncio.create_task(node_caller(amqp_url, queue_names, **keys, TIMEOUT_MS="4000"))
    token = {"object": "sign_in_token", "id": "sit_x", "user_id": "user_ts_json", "status": "pending"}
    forgeries = [
        {"outcome": "created", "sign_in_token": {**token, "sealed": "AAAA"}},
        {"outcome": "created", "signInToken": {"token": "forged", "url": "https://evil.example/1"}},
        {"outcome": "created", "sign_in_token": {**token, "token": "forged", "url": "https://evil.example/2"}},
        {"outcome": "revoked", "sign_in_token": {**token, "token": "forged", "url": "https://evil.example/3"}},
        {"outcome": "created", "actor_token": {**token, "sealed": base64.b64encode(bytes(64)).decode()}},
    ]
    for queue, forged in zip(["REQUEST_QUEUE"] * 4 + ["IMPERSONATION_QUEUE"], forgeries, strict=True):
        request = await get_message(channel, queue_names[queue])
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(forged).encode(),
                content_type="application/json",
                correlation_id=request.correlation_id,
                user_id=broker_user(amqp_url),
                headers={"x-outcome": forged["outcome"], "x-caller": broker_user(amqp_url)},
            ),
            request.reply_to or "",
        )
    code, replies, stderr = await node
    assert (code, replies) == (1, {})
    assert stderr.count("forged reply dropped") == 5, stderr
    assert "no reply for" in stderr


@pytest.mark.parametrize("service_keys", ["", encoded(bytes(32)), "c2hvcnQ="])
async def test_a_sealed_nodejs_caller_refuses_a_service_key_that_is_none(
    amqp_url: str, queue_names: dict[str, str], service_keys: str
) -> None:
    """None, all zeros (any forger could seal with its shared key) or too short: one line, exit 2, nothing sent."""
    caller = encoded(bytes(PrivateKey.generate()))
    code, replies, stderr = await node_caller(
        amqp_url, queue_names, REPLY_PRIVATE_KEY=caller, SERVICE_PUBLIC_KEY=service_keys
    )
    assert (code, replies) == (2, {})
    assert stderr.strip() == "SERVICE_PUBLIC_KEY: each key must be the service's public key, 32 bytes in base64"
