"""The worker as a process: signals, crashes, bad configuration, secrets in its logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from aio_pika.abc import AbstractChannel
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created

from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import free_port
from tests.conftest import SECRET_KEY, WorkerFactory, queue_depth, wait_until
from tests.ledger import Ledger
from tests.workers import Replies, WorkerProcess, WorkerProcesses, publish_requests, wait_ready

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_worker_stopped_mid_flight_loses_no_request(
    sig: signal.Signals,
    worker_processes: WorkerProcesses,
    fake_clerk: FakeClerk,
    queue_names: dict[str, str],
    channel: AbstractChannel,
    replies: Replies,
    start_worker: WorkerFactory,
    token_ledger: Ledger,
) -> None:
    """SIGTERM exits 0 within the grace period; SIGKILL is a crash; either way every request is answered after.

    200 requests at 4 x 200 ms take 10 s: more than the 5 s grace, so some are
    finished and the rest returned to the queue.
    """
    fake_clerk.latency_seconds = 0.2
    worker = await worker_processes.start(
        UPSTREAM_CONCURRENCY="4", SHUTDOWN_GRACE_SECONDS="5", REQUEST_TIMEOUT_SECONDS="2"
    )
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 200)
    await wait_until(lambda: replies.answered >= 4, what="the first replies")
    await wait_until(lambda: '"replied"' in worker_processes.logs(), what="the first replies in the worker's log")
    signalled = time.monotonic()
    exit_code = await worker_processes.stop(worker, sig, timeout=15)
    assert exit_code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert time.monotonic() - signalled < 5
    assert replies.answered < 200, "the signal came after all the work; the test proves nothing"
    await start_worker(upstream_concurrency=32)
    await wait_until(lambda: replies.answered == 200, timeout=60, what="every request answered after the restart")
    logs = worker_processes.logs()
    assert ("worker_stopped" in logs) == (sig == signal.SIGTERM)
    assert "Traceback" not in logs
    replied = [e for e in worker_processes.events() if e["event"] == "replied"]
    assert {"correlation_id", "message_id", "user_id", "lane", "attempts", "outcome"} <= set(replied[0])
    for token in fake_clerk.stats.tokens.values():
        assert token["token"] not in logs
    assert SECRET_KEY not in logs
    # SIGTERM waits for the calls at Clerk; SIGKILL cuts at most UPSTREAM_CONCURRENCY (4) of them.
    await token_ledger.balanced(cut=0 if sig == signal.SIGTERM else 4)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the command to completion."""
    return subprocess.run(  # noqa: S603 - our own module
        [sys.executable, "-m", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def base_env() -> dict[str, str]:
    """The environment less every variable the service reads."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "AMQP_", "HTTP_"))}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "CLERK_SECRET_KEY"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "AMQP_URL": "http://nope"}, "AMQP_URL"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "CLERK_API_URL": "not a url"}, "CLERK_API_URL"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "HTTP_PORT": "eighty"}, "HTTP_PORT"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS"),
        ({"CLERK_SECRET_KEY_FILE": "/no/such/file"}, "CLERK_SECRET_KEY_FILE"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "HTTP_HOST": "abc"}, "HTTP_HOST"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "DELIVERY_LIMIT": "99999999999999999999"}, "DELIVERY_LIMIT"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "SHUTDOWN_GRACE_SECONDS": "inf"}, "SHUTDOWN_GRACE_SECONDS"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "OUTAGE_HOLD_SECONDS": "1e20"}, "OUTAGE_HOLD_SECONDS"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "OUTAGE_HOLD_SECONDS": "1700"}, "CONSUMER_TIMEOUT_SECONDS"),
        # A grace period that cannot cover one Clerk call would leave its token unheld.
        ({"CLERK_SECRET_KEY": "sk_test_x", "SHUTDOWN_GRACE_SECONDS": "10"}, "SHUTDOWN_GRACE_SECONDS"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "SHUTDOWN_GRACE_SECONDS": "12.9"}, "REQUEST_TIMEOUT_SECONDS"),
        # The secret key would travel in clear; a broker login whose user the worker cannot know.
        ({"CLERK_SECRET_KEY": "sk_test_x", "CLERK_API_URL": "http://api.clerk.com/v1"}, "CLERK_API_URL"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "AMQP_URL": "amqps://rabbit/?auth=external"}, "AMQP_USER"),
        # The worker's sealing key: a file that is not there, and one that holds no key.
        ({"CLERK_SECRET_KEY": "sk_test_x", "REPLY_SEALING_KEY_FILE": "/no/such/file"}, "REPLY_SEALING_KEY_FILE"),
        ({"CLERK_SECRET_KEY": "sk_test_x", "REPLY_SEALING_KEY_FILE": "/etc/hostname"}, "line 1: a key is 32 bytes"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(env: dict[str, str], names: str) -> None:
    """A missing key or malformed value: exit 2 and one stderr line naming the variable."""
    result = run_cli("worker", env={**base_env(), **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    assert "sk_test_x" not in result.stderr


def test_unreachable_broker_is_retried_then_one_line_and_nonzero_exit() -> None:
    """No broker within STARTUP_TIMEOUT_SECONDS: one line naming the broker, non-zero exit, no traceback."""
    env = {
        **base_env(),
        "CLERK_SECRET_KEY": "sk_test_x",
        "AMQP_URL": f"amqp://guest:secretpw@127.0.0.1:{free_port()}/",
        "STARTUP_TIMEOUT_SECONDS": "1.5",
        "HTTP_PORT": "0",
        "LOG_LEVEL": "error",
    }
    result = run_cli("worker", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot reach the broker" in lines[0]
    assert "secretpw" not in result.stderr


async def test_request_command_prints_the_reply(
    worker: object,
    amqp_url: str,
    queue_names: dict[str, str],
) -> None:
    """`sign-in-tokens request USER_ID` prints the reply and exits 0 when created, 1 when not."""
    env = {**base_env(), "AMQP_URL": amqp_url, **queue_names}
    created = await asyncio.to_thread(run_cli, "request", "user_cli", "--expires-in", "60", env=env)
    assert created.returncode == 0, created.stderr
    assert '"outcome": "created"' in created.stdout
    missing = await asyncio.to_thread(run_cli, "request", "nobody", env=env)
    assert missing.returncode == 1
    assert '"code": "user_not_found"' in missing.stdout


async def test_impersonate_command_prints_the_actor_token(
    start_worker: WorkerFactory, amqp_url: str, queue_names: dict[str, str], tmp_path: Path
) -> None:
    """`sign-in-tokens impersonate USER --actor AGENT`: the actor token, exit 0; refused, the reply and exit 1."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[defaults]\nlanes = ["impersonate"]\nmax_expires_in_seconds = 60\nreply_to = ["amq.rabbitmq.reply-to"]\n'
        'impersonate = ["user_*"]\nactors = ["user_agent_*"]\nactor_keys = ["email"]\n'
    )
    await start_worker(policy_file=str(policy))
    env = {**base_env(), "AMQP_URL": amqp_url, **queue_names}
    args = ("impersonate", "user_cli", "--actor", "user_agent_1", "--actor-key", "email=a@example.com")
    created = await asyncio.to_thread(run_cli, *args, "--session-max", "300", env=env)
    assert created.returncode == 0, created.stderr
    reply = json.loads(created.stdout)
    assert (reply["outcome"], reply["actor_token"]["actor"]) == (
        "created",
        {"sub": "user_agent_1", "email": "a@example.com"},
    )
    refused = await asyncio.to_thread(run_cli, "impersonate", "user_cli", "--actor", "someone", env=env)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"]["code"] == "forbidden"
    bad = await asyncio.to_thread(run_cli, "impersonate", "user_cli", "--actor", "a", "--actor-key", "email", env=env)
    assert (bad.returncode, bad.stderr.count("\n")) == (2, 1)
    assert "--actor-key: expected KEY=VALUE" in bad.stderr


async def test_the_demo_shows_an_impersonation(amqp_url: str, queue_names: dict[str, str]) -> None:
    """`demo --impersonate`: the actor token (masked), its act claim, revoked, and its two audit events."""
    prefix = queue_names["REQUEST_QUEUE"].split(".")[0]
    env = {
        **base_env(),
        "AMQP_URL": amqp_url,
        **queue_names,
        "AUDIT_EXCHANGE": f"{prefix}.audit",
        "AUDIT_ARCHIVE_QUEUE": "none",
        "POLICY_FILE": "",
    }
    shown = await asyncio.to_thread(run_cli, "demo", "--impersonate", env=env)
    assert shown.returncode == 0, shown.stderr
    out = shown.stderr
    assert "user_demo_agent_1 asks to log in as user_demo_customer" in out
    assert 'act claim: {"sub": "user_demo_agent_1"}' in out
    assert "is 'revoked'" in out
    events = [json.loads(line.split(": ", 2)[2]) for line in out.splitlines() if line.startswith("demo:   ")]
    assert [(e["event"], e["kind"], e["actor_sub"]) for e in events] == [
        ("created", "actor_token", "user_demo_agent_1"),
        ("revoked", "actor_token", "user_demo_agent_1"),
    ]
    assert re.search(r"eyJ[\w-]+\.[\w-]+\.", out) is None  # no whole JWT: the token is masked
    assert '"token": "eyJhbGciOiAi…[masked]"' in out


def test_http_port_in_use_is_one_line_and_exit_2() -> None:
    """Another process holds HTTP_PORT: one line naming it, exit 2, before any broker is tried."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**base_env(), "CLERK_SECRET_KEY": "sk_test_x", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port)}
        result = run_cli("worker", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "HTTP_PORT" in lines[0]


async def test_sigterm_ends_the_start_up_retries_at_once(worker_processes: WorkerProcesses) -> None:
    """While the broker is retried (STARTUP_TIMEOUT_SECONDS=40), SIGTERM exits 0 within a second or two."""
    worker = worker_processes.spawn(
        AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/", STARTUP_TIMEOUT_SECONDS="40", HTTP_PORT="0"
    )
    await wait_until(lambda: "broker_unreachable" in worker_processes.logs(), what="the first retry")
    signalled = time.monotonic()
    assert await worker_processes.stop(worker, signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - signalled < 5
    assert "Traceback" not in worker_processes.logs()


async def test_sigterm_during_a_clerk_outage_returns_held_requests_at_once(
    worker_processes: WorkerProcesses, fake_clerk: FakeClerk, client: SignInTokenClient
) -> None:
    """Requests held by the breaker go back to their queue on SIGTERM; the exit does not wait out the grace period."""
    fake_clerk.fail_next(503, count=10_000)
    worker = await worker_processes.start(
        OUTAGE_FAILURE_THRESHOLD="1", SHUTDOWN_GRACE_SECONDS="20", PROBE_MAX_INTERVAL_SECONDS="0.5"
    )
    for i in range(5):
        await client.send(b'{"user_id": "user_h%d"}' % i)
    await wait_until(lambda: "upstream_unavailable_pausing" in worker_processes.logs(), what="the breaker to open")
    signalled = time.monotonic()
    assert await worker_processes.stop(worker, signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - signalled < 5
    returned = [e for e in worker_processes.events() if e["event"] == "returned_to_queue"]
    assert {e["reason"] for e in returned} == {"shutting_down"}


async def test_sighup_without_a_policy_file_is_logged_and_ends_nothing(
    worker_processes: WorkerProcesses, client: SignInTokenClient
) -> None:
    """SIGHUP reloads POLICY_FILE; without one, the worker says there is nothing to reload and keeps answering."""
    worker = await worker_processes.start()
    worker.process.send_signal(signal.SIGHUP)
    await wait_until(lambda: "policy_not_reloaded" in worker_processes.logs(), what="the SIGHUP log line")
    assert worker.alive()
    assert isinstance(await client.request("user_after_hup"), Created)


@pytest.mark.parametrize(
    ("args", "url", "expected"),
    [
        (("--timeout", "nan"), None, "--timeout"),
        (("--timeout", "-1"), None, "--timeout"),
        ((), "amqp://guest:guest@127.0.0.1:{free}/", "cannot reach the broker at 127.0.0.1:"),
        ((), "amqp://guest:wrong@{broker}/", "refused the credentials"),
    ],
)
async def test_request_command_failures_are_one_line_and_publish_nothing(
    args: tuple[str, ...],
    url: str | None,
    expected: str,
    amqp_url: str,
    queue_names: dict[str, str],
    channel: AbstractChannel,
) -> None:
    """A bad --timeout or an unusable broker: one clear line, non-zero exit, no request published."""
    await channel.declare_queue(queue_names["REQUEST_QUEUE"], durable=True)
    broker = amqp_url.split("@", 1)[1].rstrip("/")
    target = (url or amqp_url).format(free=free_port(), broker=broker)
    env = {**base_env(), "AMQP_URL": target, **queue_names}
    result = await asyncio.to_thread(run_cli, "request", "user_x", *args, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "wrong" not in result.stderr
    assert await queue_depth(channel, queue_names["REQUEST_QUEUE"]) == 0


async def test_failures_and_retries_are_logged_with_what_clerk_said(
    worker_processes: WorkerProcesses, client: SignInTokenClient, fake_clerk: FakeClerk
) -> None:
    """A failure's `replied` line carries Clerk's message, status, code and trace id; a retry its attempt and status."""
    await worker_processes.start(RETRY_BASE_SECONDS="0.01")
    await client.request("nobody")
    fake_clerk.fail_next(503)
    assert isinstance(await client.request("user_retried"), Created)
    await wait_until(lambda: worker_processes.logs().count('"replied"') == 2, what="both replied lines")
    events = worker_processes.events()
    replied = next(e for e in events if e["event"] == "replied")
    assert (replied["outcome"], replied["upstream_status"]) == ("user_not_found", 404)
    assert replied["upstream_code"] == "resource_not_found"
    assert replied["clerk_trace_id"]
    assert replied["message"]
    retry = next(e for e in events if e["event"] == "retrying_upstream")
    assert (retry["attempt"], retry["upstream_status"], retry["error"]) == (1, 503, "upstream_unavailable")


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def metrics_of(port: int) -> str:
    """The /metrics page on ``port``."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()


async def two_processes(worker_processes: WorkerProcesses, redis_url: str) -> WorkerProcess:
    """`worker --processes 2`, both workers ready (on HTTP_PORT and HTTP_PORT+1)."""
    supervisor = worker_processes.spawn("worker", "--processes", "2", REDIS_URL=redis_url)
    for port in (supervisor.port, supervisor.port + 1):
        await wait_ready(port)
    return supervisor


async def test_processes_share_the_work_and_stop_together(
    worker_processes: WorkerProcesses,
    queue_names: dict[str, str],
    channel: AbstractChannel,
    replies: Replies,
    redis_url: str,
    token_ledger: Ledger,
) -> None:
    """`worker --processes 2`: two workers on HTTP_PORT and HTTP_PORT+1 both answer; SIGTERM stops both, exit 0."""
    supervisor = await two_processes(worker_processes, redis_url)
    children = psutil.Process(supervisor.pid).children()
    assert len(children) == 2
    await publish_requests(channel, queue_names["REQUEST_QUEUE"], replies.queue, 400)
    await wait_until(lambda: replies.answered == 400, timeout=60, what="every request answered")
    assert replies.duplicates == 0
    for port in (supervisor.port, supervisor.port + 1):
        assert metric(await metrics_of(port), "sign_in_tokens_requests_total") > 0, f"the worker on {port} did nothing"
    assert await worker_processes.stop(supervisor, signal.SIGTERM) == 0
    assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in worker_processes.logs()
    await token_ledger.balanced()


async def test_a_process_that_dies_stops_the_set(
    worker_processes: WorkerProcesses,
    redis_url: str,
) -> None:
    """One worker killed: the supervisor stops the other and exits 1, so the orchestrator restarts the set."""
    supervisor = await two_processes(worker_processes, redis_url)
    first, second = psutil.Process(supervisor.pid).children()
    first.kill()
    assert await asyncio.to_thread(supervisor.process.wait, 30) == 1
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
    assert "worker_process_ended" in worker_processes.logs()


def test_processes_without_redis_is_one_line_and_exit_2() -> None:
    """More than one process needs REDIS_URL: their rate limit and idempotency store are shared there."""
    result = run_cli("worker", "--processes", "2", env={**base_env(), "CLERK_SECRET_KEY": "sk_test_x"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "REDIS_URL" in lines[0]


async def test_the_fake_clerk_command_serves_clerk_s_api_until_stopped() -> None:
    """`sign-in-tokens fake-clerk --port P`, as the README shows it: a token for its default key, 401 for another, SIGTERM ends it."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "fake-clerk",
        "--port",
        str(port),
        env=base_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/v1/sign_in_tokens"
    try:
        async with aiohttp.ClientSession() as http:
            answers: list[int] = []

            async def answered() -> bool:
                try:
                    async with http.post(
                        url, json={"user_id": "user_1"}, headers={"Authorization": "Bearer sk_test_fake"}
                    ) as r:
                        answers.append(r.status)
                        return True
                except aiohttp.ClientConnectionError:
                    return False

            deadline = asyncio.get_running_loop().time() + 30
            while not await answered():
                assert asyncio.get_running_loop().time() < deadline, "the fake Clerk never listened"
                await asyncio.sleep(0.1)  # wait-ok: the poll interval of a condition wait
            async with http.post(
                url, json={"user_id": "user_1"}, headers={"Authorization": "Bearer sk_test_other"}
            ) as r:
                answers.append(r.status)
        assert answers == [200, 401]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
    assert process.returncode == 0, (await process.stderr.read()).decode() if process.stderr else ""
