"""Contract v3, trust: a hostile caller or a careless operator cannot get, forge, hide or leak a token.

Callers are real broker users (``caller_urls``: support-portal, billing, outsider); the workers
and the tests' own connections are guest, the service user here (SERVICE_USER).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from pathlib import Path

import aio_pika
import msgspec
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelPreconditionFailed
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created, Failed, decode_reply

from service.callers.bulk import BulkRun, BulkService, reply_queue_name
from service.callers.bulk_files import _message_id
from service.local.fake_clerk import FakeClerk
from tests.conftest import WorkerFactory, get_message, queue_depth, wait_until
from tests.integration.test_policy import edit
from tests.ledger import Ledger
from tests.workers import WorkerProcesses

PORTAL_POLICY = """
[defaults]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 600
reply_to = ["amq.rabbitmq.reply-to", "amq_*", "sign-in-tokens-bulk.*"]

[callers.support-portal]
lanes = ["interactive"]
max_expires_in_seconds = 300
reply_to = ["amq.rabbitmq.reply-to", "amq_*"]
"""


def write_policy(tmp_path: Path, text: str = PORTAL_POLICY) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def client_as(url: str, queue_names: dict[str, str], **options: object) -> SignInTokenClient:
    return SignInTokenClient(
        url,
        request_queue=queue_names["REQUEST_QUEUE"],
        bulk_queue=queue_names["BULK_QUEUE"],
        revoke_queue=queue_names["REVOKE_QUEUE"],
        **options,  # type: ignore[arg-type]
    )


def forged_reply(
    correlation_id: str, user_id: str = "user_1", *, url: str = "https://evil.example/t"
) -> aio_pika.Message:
    """A created reply as an attacker writes it: the service's shape, a token and URL of its own."""
    token = {
        "object": "sign_in_token",
        "id": "sit_forged",
        "user_id": user_id,
        "token": "forged",
        "url": url,
        "status": "pending",
        "created_at": 1,
        "updated_at": 1,
    }
    return aio_pika.Message(
        json.dumps({"outcome": "created", "sign_in_token": token}).encode(),
        content_type="application/json",
        correlation_id=correlation_id,
        headers={"x-outcome": "created", "x-caller": "guest"},
    )


async def test_a_forged_reply_in_the_bulk_tools_queue_is_dropped_and_the_real_token_written(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    amqp_url: str,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """An outsider with write on the default exchange publishes a created reply for a row first: it is not written."""
    fake_clerk.latency_seconds = 1.0  # the forger is faster than Clerk
    await start_worker()
    source = tmp_path / "users.csv"
    source.write_text("user_id\nuser_1\n")
    output = tmp_path / "out.jsonl"
    correlation_id = _message_id({"user_id": "user_1", "expires_in_seconds": None, "org_id": None}, 1)
    outsider = await aio_pika.connect_robust(caller_urls["outsider"])
    forger = await outsider.channel()
    # RabbitMQ refuses a forged user_id: the reply cannot claim to be the service's.
    with pytest.raises(ChannelPreconditionFailed):
        await forger.default_exchange.publish(
            aio_pika.Message(b"{}", user_id="guest"), reply_queue_name(output, "guest")
        )
    forger = await outsider.channel()
    run = BulkRun(
        BulkService(amqp_url, queue_names["BULK_QUEUE"], "guest", "guest"),
        source,
        output,
        tmp_path / "failed.csv",
        10,
        progress=False,
    )
    async with run:
        job = asyncio.create_task(run.run(asyncio.Event()))
        await wait_until(lambda: fake_clerk.stats.create_calls == 1, what="the row at Clerk")
        await forger.default_exchange.publish(forged_reply(correlation_id), reply_queue_name(output, "guest"))
        summary = await asyncio.wait_for(job, 30)
    await outsider.close()
    (entry,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert entry["sign_in_token"]["id"] in fake_clerk.stats.tokens
    assert "evil" not in output.read_text()
    assert (summary.complete, summary.outcomes["created"]) == (True, 1)


async def test_the_client_drops_replies_not_from_the_service_or_for_another_caller(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """A forged reply in the portal's queue, and the service's own reply to billing's request pointed there: dropped."""
    fake_clerk.latency_seconds = 0.5
    await start_worker(policy_file=write_policy(tmp_path))
    async with client_as(caller_urls["support-portal"], queue_names, replies="queue", service_user="guest") as portal:
        call = asyncio.create_task(portal.create("user_portal", timeout=10))
        await wait_until(lambda: fake_clerk.stats.create_calls == 1, what="the portal's request at Clerk")
        correlation_id = next(iter(portal._pending))
        outsider = await aio_pika.connect_robust(caller_urls["outsider"])
        await (await outsider.channel()).default_exchange.publish(
            forged_reply(correlation_id, "user_portal"), portal.reply_queue
        )
        # billing points its reply_to at the portal's amq_ queue (a glob its policy allows), with the
        # portal's correlation id: the service's own reply, but for another caller and another user.
        billing = await aio_pika.connect_robust(caller_urls["billing"])
        await (await billing.channel()).default_exchange.publish(
            aio_pika.Message(
                b'{"user_id": "user_billing"}',
                reply_to=portal.reply_queue,
                correlation_id=correlation_id,
                user_id="billing",
            ),
            queue_names["REQUEST_QUEUE"],
        )
        token = await asyncio.wait_for(call, 15)
        await outsider.close()
        await billing.close()
    assert token.user_id == "user_portal"
    assert token.id in fake_clerk.stats.tokens


async def test_a_cut_off_caller_gets_forbidden_for_everything_after_sighup(
    worker_processes: WorkerProcesses,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    tmp_path: Path,
) -> None:
    """Lanes = [] in the file and SIGHUP: the portal is refused creates and revocations, while [defaults] exists."""
    path = write_policy(tmp_path)
    worker = await worker_processes.start(POLICY_FILE=path)
    async with client_as(caller_urls["support-portal"], queue_names, service_user="guest") as portal:
        token = await portal.create("user_1", timeout=10)
        edit(path, 'lanes = ["interactive"]\n', "lanes = []\n")
        worker.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "policy_reloaded" in worker_processes.logs(), what="the reload")
        for ask in (portal.create("user_2", timeout=10), portal.revoke(token.id, timeout=10)):
            with pytest.raises(Exception, match="may use no lane") as refused:
                await ask
            assert refused.value.code == "forbidden"  # type: ignore[attr-defined]


async def test_a_token_given_to_a_nameless_caller_cannot_be_revoked_through_the_queue(
    start_worker: WorkerFactory, channel: AbstractChannel, queue_names: dict[str, str], fake_clerk: FakeClerk
) -> None:
    """Without a policy, nameless callers are served; the revocation of their token is forbidden, Clerk not called."""
    await start_worker()
    replies = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_1"}', reply_to=replies.name), queue_names["REQUEST_QUEUE"]
    )
    created = decode_reply((await get_message(channel, replies.name)).body, None)
    assert isinstance(created, Created)
    body = msgspec.json.encode({"sign_in_token_id": created.sign_in_token.id})
    await channel.default_exchange.publish(aio_pika.Message(body, reply_to=replies.name), queue_names["REVOKE_QUEUE"])
    refused = decode_reply((await get_message(channel, replies.name)).body, None)
    assert isinstance(refused, Failed)
    assert (refused.error.code, refused.error.message) == (
        "forbidden",
        "revocation: a request without a user_id property cannot revoke a token",
    )
    assert fake_clerk.stats.revoke_calls == 0


async def test_a_reply_to_that_merely_starts_like_direct_reply_to_is_refused(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """amq.rabbitmq.reply-toX passed the old prefix check: now it is dead-lettered, no call to Clerk."""
    await start_worker(policy_file=write_policy(tmp_path))
    portal = await aio_pika.connect_robust(caller_urls["support-portal"])
    await (await portal.channel()).default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_1"}', reply_to="amq.rabbitmq.reply-toX", user_id="support-portal"),
        queue_names["REQUEST_QUEUE"],
    )
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "forbidden_reply_to"
    assert fake_clerk.stats.create_calls == 0
    await portal.close()


async def test_a_policy_with_defaults_but_no_anonymous_is_warned_of_at_start(
    worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    """v2 callers that send no user_id stop being served: the worker says so when it starts."""
    await worker_processes.start(POLICY_FILE=write_policy(tmp_path))
    assert '"event":"nameless_callers_refused"' in worker_processes.logs()


BULK_DOCS_POLICY = """
[callers.onboarding-job]
lanes = ["bulk"]
max_expires_in_seconds = 604800
reply_to = ["sign-in-tokens-bulk.*"]
"""


async def test_the_bulk_tool_is_served_under_the_documented_policy_and_a_refused_run_ends_with_one_line(
    worker_processes: WorkerProcesses, session_node: object, tmp_path: Path, caller_urls: dict[str, str]
) -> None:
    """The tool sends its user: served under its documented table; refused by a policy, it ends, it does not hang."""
    del session_node, caller_urls
    source = tmp_path / "users.csv"
    source.write_text("user_id\nuser_1\nuser_2\n")
    # The tests' broker user is guest: the documented table, under that name.
    policy = write_policy(tmp_path, BULK_DOCS_POLICY.replace("onboarding-job", "guest"))
    await worker_processes.start(POLICY_FILE=policy)
    tool = worker_processes.spawn("bulk", str(source), "-o", str(tmp_path / "out.jsonl"), "--no-progress")
    assert await asyncio.to_thread(tool.process.wait, 60) == 0, tool.log_path.read_text()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["outcome"] for row in rows] == ["created", "created"]
    # The same run refused outright (guest has no rules): one line after the reply timeout, exit 1.
    edit(policy, "[callers.guest]", "[callers.onboarding-job]")
    worker_processes.started[0].process.send_signal(signal.SIGHUP)
    await wait_until(lambda: "policy_reloaded" in worker_processes.logs(), what="the reload")
    source.write_text("user_id\nuser_3\n")
    refused = worker_processes.spawn(
        "bulk", str(source), "-o", str(tmp_path / "refused.jsonl"), "--no-progress", "--reply-timeout", "3"
    )
    assert await asyncio.to_thread(refused.process.wait, 60) == 1
    said = refused.log_path.read_text()
    assert "no reply for 3 s with 1 rows unanswered" in said
    assert len([line for line in said.splitlines() if line.startswith("sign-in-tokens bulk:")]) == 1, said
    assert "Traceback" not in said


@pytest.mark.parametrize("which", ["output", "failures"])
def test_the_bulk_tool_never_writes_through_a_symbolic_link(tmp_path: Path, which: str) -> None:
    """A link at the output or failures path: one line, exit 2, its target untouched."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    source = tmp_path / "users.csv"
    source.write_text("user_id\nuser_1\n")
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    target.chmod(0o644)
    output, failures = tmp_path / "out.jsonl", tmp_path / "failed.csv"
    link = output if which == "output" else failures
    link.symlink_to(target)
    done = subprocess.run(  # noqa: S603 - our own module
        [sys.executable, "-m", "service", "bulk", str(source), "-o", str(output), "--failures", str(failures)],
        env={**os.environ, "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "is a symbolic link" in done.stderr
    assert (target.read_text(), target.stat().st_mode & 0o777) == ("keep me\n", 0o644)


async def test_deleting_the_audit_exchange_never_lets_a_token_out_unrecorded(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    client: SignInTokenClient,
) -> None:
    """An operator's own archive (AUDIT_ARCHIVE_QUEUE=none): with its binding gone, events are returned, the request held.

    The worker declares the exchange again, but a bare exchange records nothing: no reply, readiness says
    audit_routed false; the request goes back to its queue and is answered once an archive is bound again.
    """
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    exchange = f"{prefix}.audit"
    worker = await start_worker(audit_exchange=exchange, audit_archive_queue="none", max_attempts=2)
    archive = await channel.declare_queue(f"{prefix}.archive", exclusive=True)
    await archive.bind(exchange, "#")
    assert (await client.create("user_1")).user_id == "user_1"
    await (await channel.get_exchange(exchange, ensure=False)).delete()
    pending = await client.send(b'{"user_id": "user_2"}')
    await wait_until(lambda: not worker.readiness()["audit_routed"], what="audit_routed false")
    await wait_until(lambda: worker.metrics.audit_unconfirmed._value.get() >= 2, what="two unrouted attempts")
    assert not pending.done()
    await wait_until(lambda: fake_clerk.stats.created == 2, what="the second token made")
    await archive.bind(exchange, "#")
    reply = (await asyncio.wait_for(pending, 30)).decode()
    assert isinstance(reply, Created)
    assert worker.readiness()["audit_routed"]
    keys = []
    while (event := await archive.get(no_ack=True, fail=False)) is not None:
        keys.append(event.routing_key)
    assert keys[-1] == "created.interactive"
    assert await queue_depth(channel, queue_names["DEAD_LETTER_QUEUE"]) == 0


async def test_a_token_whose_event_is_never_routed_is_revoked_before_its_request_is_dead_lettered(
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    token_ledger: Ledger,
) -> None:
    """No queue takes the audit events: at the request's last delivery its token is revoked, then the broker gives up."""
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    await start_worker(audit_exchange=f"{prefix}.audit", audit_archive_queue="none", max_attempts=1, delivery_limit=2)
    replies = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_1"}', message_id="m1", reply_to=replies.name),
        queue_names["REQUEST_QUEUE"],
    )
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"], timeout=30)
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    ledger = await token_ledger.balanced()
    assert (ledger.made, ledger.revoked) == (1, 1)
    assert await queue_depth(channel, replies.name) == 0


ANONYMOUS_POLICY = """
[anonymous]
lanes = ["interactive"]
max_expires_in_seconds = 60
reply_to = ["amq_*"]

[callers.support-portal]
lanes = []
max_expires_in_seconds = 60
reply_to = ["amq_*"]
"""


async def test_nameless_callers_never_share_an_answer_and_a_cut_off_caller_is_warned_of(
    worker_processes: WorkerProcesses,
    caller_urls: dict[str, str],
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    tmp_path: Path,
) -> None:
    """Two broker users, no user_id, the same message_id: two tokens, each to its own queue; a retry is answered again.

    The portal is cut off (lanes = []) while [anonymous] serves: the worker says it can ask nameless.
    """
    await worker_processes.start(POLICY_FILE=write_policy(tmp_path, ANONYMOUS_POLICY))
    logs = worker_processes.logs()
    assert '"event":"anonymous_wider_than_callers"' in logs
    assert '"callers":["support-portal"]' in logs
    tokens: dict[str, list[str]] = {}
    for who in ("billing", "outsider", "billing"):
        connection = await aio_pika.connect_robust(caller_urls[who])
        channel = await connection.channel()
        replies = await channel.declare_queue(f"amq_{who}_{queue_names['REQUEST_QUEUE']}", auto_delete=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"user_id": "user_1"}', message_id="invoice-42", reply_to=replies.name),
            queue_names["REQUEST_QUEUE"],
        )
        reply = decode_reply((await get_message(channel, replies.name)).body, None)
        assert isinstance(reply, Created)
        tokens.setdefault(who, []).append(reply.sign_in_token.id)
        await connection.close()
    assert tokens["billing"][0] == tokens["billing"][1]  # its own retry: the same answer
    assert tokens["outsider"][0] != tokens["billing"][0]  # never another's
    assert fake_clerk.stats.create_calls == 2


@pytest.mark.parametrize("target", ["archive", "REVOCATIONS_QUEUE", "REQUEST_QUEUE", "DEAD_LETTER_QUEUE"])
async def test_no_reply_goes_to_one_of_the_services_own_queues(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    channel: AbstractChannel,
    queue_names: dict[str, str],
    fake_clerk: FakeClerk,
    target: str,
) -> None:
    """ALLOWED_PUBLISHERS lets a caller name any reply_to, yet never the archive (a token in the trail) or the lanes."""
    archive = f"{queue_names['REQUEST_QUEUE']}.audit.archive"
    await start_worker(allowed_publishers="support-portal", audit_archive_queue=archive)
    portal = await aio_pika.connect_robust(caller_urls["support-portal"])
    reply_to = archive if target == "archive" else queue_names[target]
    await (await portal.channel()).default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_1"}', reply_to=reply_to, user_id="support-portal"),
        queue_names["REQUEST_QUEUE"],
    )
    await portal.close()
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "forbidden_reply_to"
    assert fake_clerk.stats.create_calls == 0
    await channel.queue_delete(archive)


async def test_a_dead_letter_copy_names_no_publisher_a_caller_chose(
    start_worker: WorkerFactory,
    caller_urls: dict[str, str],
    channel: AbstractChannel,
    queue_names: dict[str, str],
    tmp_path: Path,
) -> None:
    """A nameless request with its own x-original-user-id, x-caller and x-death: the copy keeps none of them."""
    await start_worker(policy_file=write_policy(tmp_path, PORTAL_POLICY.replace("[defaults]", "[callers.billing]")))
    outsider = await aio_pika.connect_robust(caller_urls["outsider"])
    forged = {"x-original-user-id": "support-portal", "x-caller": "support-portal", "x-death": [], "x-keep": "yes"}
    await (await outsider.channel()).default_exchange.publish(
        aio_pika.Message(b'{"user_id": "user_admin_1"}', reply_to="amq_x", headers=forged),
        queue_names["REQUEST_QUEUE"],
    )
    await outsider.close()
    dead = await get_message(channel, queue_names["DEAD_LETTER_QUEUE"])
    assert dead.headers["x-dead-letter-reason"] == "forbidden_caller"
    assert dead.headers["x-original-user-id"] == ""  # nameless: nobody is named
    assert "x-caller" not in dead.headers
    assert "x-death" not in dead.headers
    assert dead.headers["x-keep"] == "yes"  # the caller's other headers stay, for a requeue
