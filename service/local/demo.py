"""The README's first command: the whole service on this machine, with traffic.

With no ``AMQP_URL`` it starts a private RabbitMQ node; with no
``CLERK_SECRET_KEY`` it serves the built-in fake Clerk and says so. It runs
the worker, sends requests through it with a progress bar, prints a summary
and one example reply with the token masked, and cleans up on exit and on
Ctrl-C. With ``--impersonate`` it shows an impersonation instead: a support
agent's actor token for a customer, the session's ``act`` claim naming the
agent, the audit trail it leaves, and the token called off. With
``--instances N`` one service fronts N Clerk instances of the fake Clerk, each
its own key and limit: both drained at their own limits, then one instance's
key rejected while the others are served, and its requests answered once the
key works again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aio_pika
import click
import msgspec
from sign_in_tokens_client.client import SignInTokenClient, SignInTokenError
from sign_in_tokens_client.contract.messages import Created, Failed, Reply, created, revoked
from sign_in_tokens_client.replies import ReceivedReply
from tqdm import tqdm

from service.callers.bulk import BulkRun, BulkService, default_outstanding, report
from service.callers.bulk_files import failures_path_for
from service.config import Settings, load_settings
from service.local.fake_clerk import FakeClerk
from service.local.rabbitmq import LocalBroker
from service.local.redis_server import LocalRedis
from service.logs import SCRUBBER, configure_logging
from service.worker.lifecycle import Worker

# Every UNKNOWN_EVERY-th demo request names a user the fake Clerk does not know.
UNKNOWN_EVERY = 50
# The built-in fake Clerk enforces a production key's limit: 1,000 calls in any 10 s.
FAKE_RATE_LIMIT = 1000
FAKE_RATE_WINDOW_SECONDS = 10.0
# The Clerk instances of ``--instances N``: a production key's limit, then development keys' (calls a 10 s window).
DEMO_INSTANCES = (("prod", 1000), ("staging", 200), ("dev", 100), ("qa", 100))
# Whom the demo's support agent logs in as, with the fake Clerk.
DEMO_CUSTOMER = "user_demo_customer"
# Without a POLICY_FILE, ``--impersonate`` runs under this one: impersonation needs a policy.
DEMO_POLICY = """\
# The demo's policy: its one broker user may do everything, impersonation included.
[defaults]
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 2592000
reply_to = ["amq.rabbitmq.reply-to"]
impersonate = ["*"]
actors = ["*"]
actor_keys = ["email"]
max_impersonation_seconds = 300
max_session_seconds = 1800

[anonymous]   # requests without a user_id property: the demo sends none
lanes = []
max_expires_in_seconds = 1
reply_to = []
"""


def say(text: str) -> None:
    """A line of the demo's narration."""
    click.echo(f"demo: {text}", err=True)


def mask(value: str) -> str:
    """The start of a secret and a mark that the rest is hidden."""
    return value[:12] + "…[masked]"


def masked_reply(reply: Reply) -> str:
    """A reply as JSON, with its token (and the URL that embeds it) masked."""
    data = msgspec.to_builtins(reply)
    token = data.get("sign_in_token") or data.get("actor_token")
    if isinstance(token, dict):
        token["token"] = mask(token["token"])
        if token.get("url"):
            token["url"] = mask(token["url"])
    return msgspec.json.format(msgspec.json.encode(data)).decode()


async def _environment(
    stack: AsyncExitStack, options: dict[str, str], *, replicas: int, instances: int = 1
) -> tuple[dict[str, str], FakeClerk | None]:
    """The demo's environment, starting what is missing; and the fake Clerk, when it is one."""
    environ = dict(os.environ)
    environ.update({k.upper(): v for k, v in options.items()})
    environ.setdefault("HTTP_PORT", "0")
    environ.setdefault("HTTP_HOST", "127.0.0.1")  # the demo serves nobody but this machine
    environ.setdefault("LOG_LEVEL", "warning")
    if replicas > 1 and not environ.get("REDIS_URL"):
        say(f"{replicas} replicas and no REDIS_URL: starting a private Redis for the rate limit and the store…")
        redis_server = LocalRedis()
        stack.push_async_callback(asyncio.to_thread, redis_server.cleanup)
        await redis_server.start()
        environ["REDIS_URL"] = redis_server.url
        say(f"Redis up at 127.0.0.1:{redis_server.port}")
    if not environ.get("AMQP_URL"):
        say("no AMQP_URL: starting a private RabbitMQ node (about 5 s)…")
        broker = LocalBroker()
        stack.push_async_callback(asyncio.to_thread, broker.cleanup)
        await broker.start()
        environ["AMQP_URL"] = broker.url
        say(f"RabbitMQ node up at 127.0.0.1:{broker.amqp_port}")
    if not environ.get("CLERK_SECRET_KEY") and not environ.get("CLERK_SECRET_KEY_FILE"):
        key = "sk_test_" + secrets.token_hex(16)
        # A production key's limit, enforced as Clerk does, and the worker told it.
        fake = FakeClerk(key, rate_limit=FAKE_RATE_LIMIT, rate_window_seconds=FAKE_RATE_WINDOW_SECONDS)
        await fake.start()
        stack.push_async_callback(fake.stop)
        environ.update(CLERK_SECRET_KEY=key, CLERK_API_URL=fake.url)
        environ.setdefault("CLERK_RATE_LIMIT", str(FAKE_RATE_LIMIT))
        say(f"no CLERK_SECRET_KEY: using the built-in fake Clerk at {fake.url}")
        if instances > 1:
            environ["CLERK_INSTANCES_FILE"] = _instances_file(stack, fake, key, instances)
        return environ, fake
    return environ, None


def _instances_file(stack: AsyncExitStack, fake: FakeClerk, first_key: str, count: int) -> str:
    """A CLERK_INSTANCES_FILE of ``count`` instances of the fake Clerk, each its key and limit, the fake told them."""
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="sign-in-tokens-demo-"))
    text = ""
    for n, (name, limit) in enumerate(DEMO_INSTANCES[:count]):
        key = first_key if n == 0 else "sk_test_" + secrets.token_hex(16)
        fake.accepted_keys.add(key)
        fake.rate_limits[key] = limit
        SCRUBBER.add_secret(key)
        text += f'[instances.{name}]\nsecret_key = "{key}"\napi_url = "{fake.url}"\nrate_limit = {limit}\n\n'
    path = Path(directory) / "instances.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    say(f"{count} Clerk instances behind one service: {path}")
    return str(path)


def _user_ids(count: int, real_user: str | None) -> list[str]:
    if real_user is not None:
        return [real_user] * count
    return [
        f"unknown_{i:05d}" if i % UNKNOWN_EVERY == UNKNOWN_EVERY - 1 else f"user_demo_{i:05d}" for i in range(count)
    ]


async def _send_all(
    client: SignInTokenClient, user_ids: list[str], stop: asyncio.Event, desc: str = "replies"
) -> list[tuple[float, ReceivedReply]]:
    """Send every request, wait for every reply (or ``stop``); return (latency, reply) pairs."""
    results: list[tuple[float, ReceivedReply]] = []
    with tqdm(total=len(user_ids), desc=desc, unit="req") as bar:

        async def one(user_id: str) -> None:
            started = time.monotonic()
            future = await client.send(msgspec.json.encode({"user_id": user_id}))
            reply = await future
            results.append((reply.received_at - started, reply))
            bar.update()

        work: asyncio.Future[Any] = asyncio.gather(*(one(u) for u in user_ids))
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            say("interrupted: cleaning up")
        stopped.cancel()
        await asyncio.gather(work, stopped, return_exceptions=True)
    return results


def _answered(worker: Worker) -> float:
    """How many requests a worker answered."""
    return sum(
        sample.value
        for metric in worker.metrics.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def _counted(workers: list[Worker], total: int) -> None:
    """Wait (5 s at most) until the workers' counters hold every reply: each counts a request once acked."""
    await _wait_for(lambda: sum(_answered(w) for w in workers) >= total, 5)


def _summary(results: list[tuple[float, ReceivedReply]], elapsed: float) -> str:
    replies = [r.decode() for _, r in results]
    created = sum(isinstance(r, Created) for r in replies)
    failures = Counter(r.error.code for r in replies if isinstance(r, Failed))
    failed = ", ".join(f"{code}: {n}" for code, n in failures.most_common()) or "none"
    latencies = sorted(seconds * 1000 for seconds, _ in results)
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else p50
    return (
        f"{len(replies)} replies in {elapsed:.2f} s: {created} created, {sum(failures.values())} failed ({failed}); "
        f"{created / elapsed:.0f} tokens/s; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


async def run_demo(
    options: dict[str, Any],
    *,
    count: int,
    user_id: str | None,
    stop: asyncio.Event,
    replicas: int = 1,
    bulk: tuple[Path, Path] | None = None,
    actor: str | None = None,
    instances: int = 1,
) -> None:
    """Run the demo end to end, with ``replicas`` workers (sharing a Redis when more than one).

    ``bulk``: onboard an input file into an output file with the bulk tool, instead of ``count`` requests.
    ``actor``: show ``actor`` impersonating ``user_id`` (an actor token) instead.
    ``instances``: with more than one, the fake Clerk's instances behind one service (see the module).
    """
    configure_logging("console", "warning")
    async with AsyncExitStack() as stack:
        options_text = {k: str(v) for k, v in options.items()}
        environ, fake = await _environment(stack, options_text, replicas=replicas, instances=instances)
        refusal = _refusal(fake, user_id, instances)
        if refusal is not None:
            say(refusal)
            return
        if actor is not None and not environ.get("POLICY_FILE"):
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="sign-in-tokens-demo-"))
            policy = Path(directory) / "policy.toml"
            policy.write_text(DEMO_POLICY, encoding="utf-8")
            environ["POLICY_FILE"] = str(policy)
            say(f"impersonation needs a policy: the demo's is {policy} (its one user may impersonate anyone)")
        settings: Settings = load_settings(environ)
        configure_logging("console", settings.log_level)
        SCRUBBER.add_secret(settings.secret_key())
        # The client is closed after the worker has stopped (the stack unwinds in
        # reverse), so no reply in flight finds its queue gone.
        client = SignInTokenClient(
            settings.amqp_url,
            request_queue=settings.request_queue,
            impersonation_queue=settings.impersonation_queue,
            revoke_queue=settings.revoke_queue,
            service_user=settings.broker_user,  # the demo runs everyone as one broker user
            name="demo-client",
        )
        await client.connect()
        stack.push_async_callback(client.close)
        workers = [Worker(settings, name=f"demo-worker-{i}") for i in range(replicas)]
        for worker in workers:
            stack.push_async_callback(worker.shutdown)
            await worker.start()
        ports = ", ".join(str(w.health.port) for w in workers)
        say(f"{replicas} worker(s) consuming {settings.request_queue!r}; /metrics on port(s) {ports}")
        if bulk is not None:
            await _onboard(settings, *bulk, stop)
            return
        if actor is not None:
            await _impersonate(client, settings, user_id or DEMO_CUSTOMER, actor)
            return
        if fake is not None and instances > 1:
            await _instances_demo(settings, fake, workers, count, stop)
            return
        say(f"sending {count} requests…")
        started = time.monotonic()
        results = await _send_all(client, _user_ids(count, None if fake is not None else user_id), stop)
        if not results:
            return
        say(_summary(results, time.monotonic() - started))
        if replicas > 1:
            await _counted(workers, len(results))
            shares = " / ".join(str(int(_answered(w))) for w in workers)
            say(f"replies per replica: {shares}; rate limit and idempotency store shared through {settings.redis_url}")
        if fake is not None:
            busiest = fake.stats.busiest_window(settings.secret_key(), FAKE_RATE_WINDOW_SECONDS)
            say(
                f"fake Clerk: {fake.stats.rate_limited} calls answered 429; busiest {FAKE_RATE_WINDOW_SECONDS:g} s "
                f"window {busiest} calls (limit {FAKE_RATE_LIMIT})"
            )
        example = next((r.decode() for _, r in results if isinstance(r.decode(), Created)), results[0][1].decode())
        say("one reply, token masked:\n" + masked_reply(example))


def _refusal(fake: FakeClerk | None, user_id: str | None, instances: int) -> str | None:
    """Why the demo cannot run with a real Clerk key as asked, or None."""
    if fake is not None:
        return None
    if instances > 1:
        return "--instances shows the fake Clerk's instances: unset CLERK_SECRET_KEY (or run the worker with yours)"
    if user_id is None:
        return "with a real CLERK_SECRET_KEY, pass --user-id USER to choose whose tokens to create"
    return None


async def _instances_demo(
    settings: Settings, fake: FakeClerk, workers: list[Worker], count: int, stop: asyncio.Event
) -> None:
    """Each instance drained at its own limit; then one's key rejected while the others are served."""
    upstreams = workers[0].parts.upstreams
    names = list(upstreams)
    total = sum(upstreams[name].instance.rate_limit for name in names)
    async with AsyncExitStack() as stack:
        clients: dict[str, SignInTokenClient] = {}
        for name in names:
            clients[name] = SignInTokenClient(
                settings.amqp_url,
                request_queue=settings.request_queue,
                bulk_queue=settings.bulk_queue,
                service_user=settings.broker_user,
                name=f"demo-client-{name}",
                instance=name,
            )
            await stack.enter_async_context(clients[name])
        shares = {name: max(1, count * upstreams[name].instance.rate_limit // total) for name in names}
        by_limit = ", ".join(f"{n} {k}" for k, n in shares.items())
        say(f"each instance's share of {count} requests, by its limit: {by_limit}")
        started = time.monotonic()
        results = await asyncio.gather(
            *(_send_all(clients[name], _user_ids(shares[name], None), stop, desc=name) for name in names)
        )
        elapsed = time.monotonic() - started
        for name, found in zip(names, results, strict=True):
            if not found:
                return
            key = upstreams[name].instance.secret_key.reveal()
            busiest = fake.stats.busiest_window(key, FAKE_RATE_WINDOW_SECONDS)
            say(
                f"  {name}: {_summary(found, elapsed)}; busiest {FAKE_RATE_WINDOW_SECONDS:g} s window "
                f"{busiest} calls (its limit {upstreams[name].instance.rate_limit})"
            )
        say(f"fake Clerk: {fake.stats.rate_limited} calls answered 429")
        held, served = names[-1], names[0]
        held_key = upstreams[held].instance.secret_key.reveal()
        fake.accepted_keys.discard(held_key)
        say(f"Clerk now rejects {held}'s key (a revoked key): 20 requests to each instance…")
        asked = time.monotonic()
        held_replies = asyncio.ensure_future(_send_all(clients[held], _user_ids(20, None), stop, desc=held))
        served_replies = await _send_all(clients[served], _user_ids(20, None), stop, desc=served)
        say(f"  {served}: {_summary(served_replies, time.monotonic() - asked)}")
        await _wait_for(lambda: not workers[0].parts.upstreams[held].key_ok, 5)
        readiness = workers[0].instances.readiness()
        say(f"  {held}: its requests wait in {settings.hold_queue(held)!r}; /readyz says {json.dumps(readiness)}")
        fake.accepted_keys.add(held_key)
        say(f"{held}'s key works again (rotated, say): its held requests are answered…")
        found = await held_replies
        say(f"  {held}: {_summary(found, time.monotonic() - asked)} (held while its key was rejected)")


async def _wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Wait until ``condition`` holds, ``seconds`` at most."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


async def _onboard(settings: Settings, input_path: Path, output_path: Path, stop: asyncio.Event) -> None:
    """The bulk tool, run against the demo's own service."""
    failures = failures_path_for(input_path, output_path)
    outstanding = default_outstanding(settings.rate_limit, settings.clerk_rate_window_seconds)
    say(f"onboarding {input_path} on the bulk lane, at most {outstanding} outstanding…")
    # The demo runs everyone as one broker user: the worker's replies come from the tool's own user.
    user = settings.broker_user
    async with BulkRun(
        BulkService(settings.amqp_url, settings.bulk_queue, user, user),
        input_path,
        output_path,
        failures,
        outstanding,
    ) as job:
        summary = await job.run(stop)
    say(report(summary, output_path, failures))


def _act_claim(token: str) -> object:
    """The ``act`` claim of a JWT's payload (not secret: it names the impersonator), or None."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("act")
    except (IndexError, ValueError, AttributeError):
        return None


async def _impersonate(client: SignInTokenClient, settings: Settings, user_id: str, actor: str) -> None:
    """An agent logs in as a customer: the actor token, its act claim, its audit events, then called off."""
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        trail = await channel.declare_queue(exclusive=True)
        await trail.bind(settings.audit_exchange, "#")
        say(f"{actor} asks to log in as {user_id}: an actor token, on {settings.impersonation_queue!r}…")
        started = time.monotonic()
        try:
            token = await client.impersonate(user_id, actor_sub=actor)
        except (SignInTokenError, TimeoutError) as exc:
            say(f"refused: {exc}")
            return
        milliseconds = (time.monotonic() - started) * 1000
        say(f"actor token in {milliseconds:.1f} ms, token masked:\n" + masked_reply(created(token)))
        act = _act_claim(token.token)
        if act is not None:
            say(f"the session it opens names the agent in its act claim: {json.dumps(act)}")
        gone = await client.revoke_actor_token(token.id)
        say(f"the agent is done before using it: revoked, {gone.id} is {gone.status!r}\n" + masked_reply(revoked(gone)))
        say("the audit trail (AUDIT_EXCHANGE), never the token:")
        for _ in range(2):
            event = await trail.get(timeout=5, fail=False)
            if event is None:
                break
            say(f"  {event.routing_key}: {event.body.decode()}")
