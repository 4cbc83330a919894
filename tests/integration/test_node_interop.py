"""A Node.js caller (amqplib, @msgpack/msgpack) gets its tokens: camelCase, direct reply-to, x-deadline, charsets.

And an actor token, asked for in camelCase on IMPERSONATION_QUEUE.

Its packages are installed by scripts/setup (``npm ci``) when ``node`` is on the machine; without
``node`` or without them, the test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey
from sign_in_tokens_client.connection import broker_user
from sign_in_tokens_client.sealing import encoded, generate_key_file

from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory

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
    """Run client.mjs to its end (skipped without Node.js or its packages); its replies by correlation id."""
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
    assert process.returncode == 0, stderr.decode()
    return {r["correlationId"]: r for r in map(json.loads, stdout.decode().splitlines())}


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


async def test_a_nodejs_caller_opens_its_sealed_replies_with_tweetnacl(
    start_worker: WorkerFactory, amqp_url: str, queue_names: dict[str, str], fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    """Its replies sealed to its key (policy), opened in Node.js: the tokens Clerk made, of both kinds."""
    service_key = tmp_path / "sealing.key"
    service_public = generate_key_file(service_key)
    caller = PrivateKey.generate()
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY + f'reply_public_key = "{encoded(bytes(caller.public_key))}"\n')
    await start_worker(policy_file=str(policy), reply_sealing_key_file=str(service_key))
    replies = await run_node_caller(
        amqp_url,
        queue_names,
        REPLY_PRIVATE_KEY=encoded(bytes(caller)),
        SERVICE_PUBLIC_KEY=encoded(service_public),
    )
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
