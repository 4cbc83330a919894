"""The ``sign-in-tokens`` command and its subcommands.

Every setting is an environment variable and, with the same name in
kebab case, an option of each subcommand (``AMQP_URL`` / ``--amqp-url``);
an option wins over the environment. Errors are one line on stderr:
exit 2 for bad configuration, 1 for anything else, never a traceback.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import msgspec
import structlog
import uvloop
from sign_in_tokens_client.connection import BrokerUnavailableError
from sign_in_tokens_client.contract.errors import ConfigError, ServiceError
from sign_in_tokens_client.contract.lanes import Lane

from service import tracing
from service.config import FIELDS, Settings, env_name, load_settings, read_key_file
from service.logs import SCRUBBER, configure_logging

# The bulk tool's default silence before it gives up (callers.bulk.REPLY_TIMEOUT_SECONDS; it imports aio-pika).
REPLY_TIMEOUT_SECONDS = 120.0

if TYPE_CHECKING:
    from sign_in_tokens_client.client import SignInTokenClient
    from sign_in_tokens_client.contract.messages import Reply
    from sign_in_tokens_client.sealing import ReplyOpener

    from service.clerk.instances import Instance
    from service.trust.policy import Policy

F = TypeVar("F", bound=Callable[..., Any])
EXIT_CONFIG = 2


def settings_options(command: F) -> F:
    """Add an option for every setting (and the key file) to ``command``."""
    for field in reversed(FIELDS):
        option = "--" + field.replace("_", "-")
        command = click.option(option, field, default=None, metavar="VALUE", help=f"Overrides ${env_name(field)}.")(
            command,
        )
    return command


def instance_option(command: F) -> F:
    """``--instance NAME``: the Clerk instance the requests name (``x-clerk-instance``)."""
    return click.option(
        "--instance",
        default=None,
        metavar="NAME",
        help="The Clerk instance to ask (x-clerk-instance). [default: the caller's default_instance, else default]",
    )(command)


def options_environ(options: dict[str, Any]) -> dict[str, str]:
    """The environment with the command line's options on top (taken out of ``options``)."""
    environ = dict(os.environ)
    for field in FIELDS:
        value = options.pop(field, None)
        if value is not None:
            environ[env_name(field)] = str(value)
    return environ


def configured(environ: dict[str, str]) -> Settings:
    """Settings from ``environ``; logging configured, the key known to the log scrubber."""
    settings = load_settings(environ)
    configure_logging(settings.log_format, settings.log_level)
    tracing.configure_from_env(environ)
    if settings.clerk_secret_key is not None:
        SCRUBBER.add_secret(settings.clerk_secret_key.reveal())
    return settings


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit."""
    click.echo(f"sign-in-tokens: {SCRUBBER.scrub_text(message)}", err=True)
    sys.exit(code)


T = TypeVar("T")


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]], on_hangup: Callable[[], object] | None = None) -> T:
    """Run ``main(stop)``: SIGTERM and SIGINT set ``stop``, SIGHUP calls ``on_hangup``; errors become exits."""

    async def with_signals() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP's default is to end the process at once: a command that has no use for it ignores it.
        loop.add_signal_handler(signal.SIGHUP, on_hangup or _ignore_sighup)
        return await main(stop)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(with_signals())
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_CONFIG)
    except (BrokerUnavailableError, ServiceError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback to a user
        structlog.get_logger(__name__).error("unexpected_error", error=exc)
        fail(f"unexpected error: {type(exc).__name__}")


def _ignore_sighup() -> None:
    structlog.get_logger(__name__).warning("sighup_ignored", reason="SIGHUP has no meaning for this command")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Clerk sign-in tokens behind a RabbitMQ queue."""


def how_many(flag: str, maximum: int, help_text: str) -> Callable[[F], F]:
    """An option counting workers: 1 by default, at most ``maximum``."""
    return click.option(flag, type=click.IntRange(min=1, max=maximum), default=1, show_default=True, help=help_text)


@main.command()
@how_many("--processes", 64, "Worker processes, one a core; above 1 needs REDIS_URL. Process k serves HTTP_PORT+k.")
@settings_options
def worker(processes: int, **options: Any) -> None:  # noqa: ANN401 - click passes the options as keywords
    """Consume requests, call Clerk, publish replies (the service)."""
    environ = options_environ(options)
    settings = _settings_or_exit(environ)
    _instances_or_exit(settings)  # a bad instances file, a key missing or unreadable: before any process
    _policy_or_exit(settings)  # a bad policy file stops the start, before any process
    if processes > 1:
        if settings.redis_url is None:
            msg = "--processes above 1 needs REDIS_URL (the processes share the rate limit and idempotency store there)"
            fail(f"configuration error: {msg}", EXIT_CONFIG)
        from service.worker.processes import run_processes  # noqa: PLC0415

        sys.exit(run_processes(processes, environ, settings.http_port, settings.shutdown_grace_seconds))
    from service.worker.lifecycle import Worker, run_worker  # noqa: PLC0415 - keeps the other commands light

    running: list[Worker] = []

    def reload() -> None:
        for each in running:
            each.reload()

    run(lambda stop: run_worker(settings, stop, started=running.append), on_hangup=reload)


@main.command("fake-clerk")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--secret-key", envvar="CLERK_SECRET_KEY", default="sk_test_fake", show_default=True)
@click.option(
    "--secret-key-file",
    envvar="CLERK_SECRET_KEY_FILE",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A file holding the key to accept (wins over --secret-key), as the worker reads it.",
)
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Added to every answer.")
@click.option("--error-rate", type=float, default=0.0, show_default=True, help="Fraction answered 503.")
@click.option("--rate-limit", type=int, default=None, help="Requests per window per key, then 429.")
@click.option("--rate-window", type=float, default=10.0, show_default=True, help="Seconds.")
def fake_clerk(
    host: str,
    port: int,
    secret_key: str,
    secret_key_file: str | None,
    latency_ms: float,
    error_rate: float,
    rate_limit: int | None,
    rate_window: float,
) -> None:
    """A local stand-in for Clerk's API (tests, demo, benchmarks)."""
    from service.local.fake_clerk import FakeClerk, serve_forever  # noqa: PLC0415

    configure_logging()
    if secret_key_file is not None:
        try:
            secret_key = read_key_file(secret_key_file)
        except ConfigError as exc:
            fail(f"configuration error: {exc}", EXIT_CONFIG)
    clerk = FakeClerk(
        secret_key,
        latency_seconds=latency_ms / 1000,
        error_rate=error_rate,
        rate_limit=rate_limit,
        rate_window_seconds=rate_window,
    )
    click.echo(f"fake Clerk on http://{host}:{port}/v1 (CLERK_API_URL); Ctrl-C to stop", err=True)
    run(lambda stop: serve_forever(clerk, host, port, stop))


@main.command()
@click.argument("user_id")
@click.option("--expires-in", type=click.IntRange(min=1), default=None, help="Seconds the token stays valid.")
@click.option("--org-id", default=None, help="Organization to activate at sign-in.")
@click.option("--bulk", is_flag=True, help="Use the bulk lane.")
@click.option("--msgpack", is_flag=True, help="Send MessagePack instead of JSON.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the reply.")
@click.option("--message-id", default=None, help="The request's idempotency key (a rerun with it gets the same token).")
@instance_option
@settings_options
def request(
    user_id: str,
    expires_in: int | None,
    org_id: str | None,
    bulk: bool,
    msgpack: bool,
    timeout: float,
    message_id: str | None,
    instance: str | None,
    **options: Any,  # noqa: ANN401
) -> None:
    """Publish one request, wait for its reply, print it (exit 1 when it failed)."""
    settings = _settings_or_exit(options_environ(options))
    lane = Lane.BULK if bulk else Lane.INTERACTIVE
    _ask_and_print(
        settings,
        lambda client: client.request(
            user_id,
            expires_in_seconds=expires_in,
            org_id=org_id,
            lane=lane,
            msgpack=msgpack,
            timeout=timeout,
            message_id=message_id,
        ),
        timeout,
        message_id,
        instance,
    )


@main.command()
@click.argument("user_id")
@click.option("--actor", "actor_sub", required=True, metavar="AGENT", help="The impersonator's user id (actor.sub).")
@click.option(
    "--actor-key",
    "actor_keys",
    multiple=True,
    metavar="KEY=VALUE",
    help="Another key of the actor object (the caller's actor_keys must list it); repeatable.",
)
@click.option("--expires-in", type=click.IntRange(min=1), default=None, help="Seconds the token stays valid.")
@click.option(
    "--session-max", type=click.IntRange(min=1), default=None, help="Seconds the impersonated session may last."
)
@click.option("--msgpack", is_flag=True, help="Send MessagePack instead of JSON.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the reply.")
@click.option("--message-id", default=None, help="The request's idempotency key (a rerun with it gets the same token).")
@instance_option
@settings_options
def impersonate(  # noqa: PLR0913 - one argument per option
    user_id: str,
    actor_sub: str,
    actor_keys: tuple[str, ...],
    expires_in: int | None,
    session_max: int | None,
    msgpack: bool,
    timeout: float,
    message_id: str | None,
    instance: str | None,
    **options: Any,  # noqa: ANN401
) -> None:
    """Ask for one actor token (AGENT logs in as USER_ID), print the reply (exit 1 when it failed)."""
    actor = {}
    for pair in actor_keys:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            fail(f"--actor-key: expected KEY=VALUE, got {pair!r}", EXIT_CONFIG)
        actor[key] = value
    settings = _settings_or_exit(options_environ(options))
    _ask_and_print(
        settings,
        lambda client: client.request_impersonation(
            user_id,
            actor_sub=actor_sub,
            actor=actor,
            expires_in_seconds=expires_in,
            session_max_duration_in_seconds=session_max,
            msgpack=msgpack,
            timeout=timeout,
            message_id=message_id,
        ),
        timeout,
        message_id,
        instance,
    )


def _ask_and_print(
    settings: Settings,
    ask: Callable[[SignInTokenClient], Coroutine[Any, Any, Reply]],
    timeout: float,
    message_id: str | None,
    instance: str | None,
) -> None:
    """Send one request with ``ask``, print its reply; exit 1 unless a token was created."""
    if not math.isfinite(timeout) or timeout <= 0:
        fail(f"--timeout: expected a positive number of seconds, got {timeout}", EXIT_CONFIG)
    from sign_in_tokens_client.client import ConnectionLostError, SignInTokenClient  # noqa: PLC0415
    from sign_in_tokens_client.contract.messages import Created  # noqa: PLC0415

    async def go(_: asyncio.Event) -> bool:
        async with SignInTokenClient(
            settings.amqp_url,
            request_queue=settings.request_queue,
            bulk_queue=settings.bulk_queue,
            impersonation_queue=settings.impersonation_queue,
            service_user=settings.service_user,
            amqp_user=settings.amqp_user,
            instance=instance,
        ) as client:
            try:
                reply = await ask(client)
            except TimeoutError:
                fail(f"no reply within {timeout:g} s (is a worker running?)")
            except ConnectionLostError as exc:
                fail(f"{exc}{f' ({message_id})' if message_id else ''}")
        click.echo(msgspec.json.format(msgspec.json.encode(reply)).decode())
        return isinstance(reply, Created)

    if not run(go):
        sys.exit(1)


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON lines, one a row (mode 0600: it holds tokens); a rerun skips the rows it has.",
)
@click.option(
    "--failures",
    "failures_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The failed rows, in the input's format, to feed back in. [default: OUTPUT.failed.csv or .jsonl]",
)
@click.option(
    "--max-outstanding",
    type=click.IntRange(min=1, max=100_000),
    default=None,
    help="Requests sent and not yet answered, at most. [default: a minute of CLERK_RATE_LIMIT]",
)
@click.option(
    "--reply-timeout",
    type=click.FloatRange(min=1, max=86_400),
    default=REPLY_TIMEOUT_SECONDS,
    show_default=True,
    help="End the run (resumable) when no reply has come for this many seconds while rows wait for one.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--private-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Sealed replies: this caller's private key (its public key is in the policy's reply_public_key).",
)
@click.option(
    "--service-public-key",
    "service_public_keys",
    multiple=True,
    metavar="KEY",
    help="Sealed replies: the service's public key (sign-in-tokens keys public); twice while it rolls.",
)
@instance_option
@settings_options
def bulk(  # noqa: PLR0913 - the command's options
    input_path: Path,
    output_path: Path,
    failures_path: Path | None,
    max_outstanding: int | None,
    reply_timeout: float,
    no_progress: bool,
    private_key_file: Path | None,
    service_public_keys: tuple[str, ...],
    instance: str | None,
    **options: Any,  # noqa: ANN401
) -> None:
    """Ask for a token for every row of INPUT (CSV with a user_id column, or .jsonl) on the bulk lane."""
    settings = _settings_or_exit(options_environ(options))
    opener = _opener_or_exit(private_key_file, service_public_keys)
    from service.callers.bulk import BulkRun, BulkService, default_outstanding, report  # noqa: PLC0415
    from service.callers.bulk_files import BulkInputError, failures_path_for  # noqa: PLC0415

    failures = failures_path or failures_path_for(input_path, output_path)
    outstanding = max_outstanding or default_outstanding(settings.rate_limit, settings.clerk_rate_window_seconds)

    async def go(stop: asyncio.Event) -> bool:
        async with BulkRun(
            BulkService(
                settings.amqp_url, settings.bulk_queue, settings.broker_user, settings.service_user, instance, opener
            ),
            input_path,
            output_path,
            failures,
            outstanding,
            reply_timeout=reply_timeout,
            progress=not no_progress,
        ) as job:
            try:
                summary = await job.run(stop)
            except BulkInputError as exc:
                fail(str(exc), EXIT_CONFIG)
        click.echo(f"sign-in-tokens bulk: {report(summary, output_path, failures)}", err=True)
        return summary.complete

    if not run(go):
        sys.exit(1)


@main.command()
@click.option("--count", type=click.IntRange(min=1), default=1000, show_default=True, help="Requests to send.")
@click.option("--user-id", default=None, help="With a real CLERK_SECRET_KEY: the user to create tokens for.")
@how_many("--replicas", 16, "Workers to run; more than one share a Redis (REDIS_URL, or a private one).")
@click.option(
    "--bulk",
    "bulk_input",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Instead of --count requests: onboard this CSV or .jsonl file with `bulk` (needs -o).",
)
@click.option("-o", "--output", "bulk_output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--impersonate",
    "actor",
    is_flag=False,
    flag_value="user_demo_agent_1",
    default=None,
    metavar="[AGENT]",
    help="Instead of --count requests: AGENT (the fake Clerk's support agent by default) logs in as "
    "--user-id (a demo customer by default) with an actor token.",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1, max=4),
    default=1,
    show_default=True,
    help="Clerk instances behind the one service (the fake Clerk's), each its own key and limit; with 2 or "
    "more, one instance's key is then rejected while the others are served.",
)
@settings_options
def demo(
    count: int,
    user_id: str | None,
    replicas: int,
    bulk_input: Path | None,
    bulk_output: Path | None,
    actor: str | None,
    instances: int,
    **options: Any,  # noqa: ANN401
) -> None:
    """Run the whole service locally and send requests through it."""
    from service.local.demo import run_demo  # noqa: PLC0415

    if (bulk_input is None) != (bulk_output is None):
        fail("--bulk FILE and -o OUTPUT go together", EXIT_CONFIG)
    explicit = {k: v for k, v in options.items() if v is not None}
    bulk = (bulk_input, bulk_output) if bulk_input is not None and bulk_output is not None else None
    if actor is not None and bulk is not None:
        fail("--impersonate and --bulk are two demos: choose one", EXIT_CONFIG)
    if instances > 1 and (actor is not None or bulk is not None):
        fail("--instances is a demo of its own: not with --impersonate or --bulk", EXIT_CONFIG)
    run(
        lambda stop: run_demo(
            explicit,
            count=count,
            user_id=user_id,
            stop=stop,
            replicas=replicas,
            bulk=bulk,
            actor=actor,
            instances=instances,
        )
    )


@main.group()
def keys() -> None:
    """The worker's key pair for sealed replies (REPLY_SEALING_KEY_FILE)."""


@keys.command("generate")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
def generate_key(path: Path) -> None:
    """Write a new X25519 private key to FILE (mode 0600, never over an existing file); print its public key."""
    from sign_in_tokens_client.sealing import encoded, generate_key_file  # noqa: PLC0415

    try:
        public = generate_key_file(path)
    except FileExistsError:
        fail(f"{path} exists: a key is never written over (move it away first)", EXIT_CONFIG)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}", EXIT_CONFIG)
    click.echo(encoded(public))


@keys.command("public")
@click.option(
    "--key-file",
    envvar="REPLY_SEALING_KEY_FILE",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The private key. [default: $REPLY_SEALING_KEY_FILE]",
)
def public_key(key_file: Path) -> None:
    """Print the public key (base64) of the worker's private key (its first, while it rolls): what a caller needs."""
    from sign_in_tokens_client.sealing import encoded, public_key_of  # noqa: PLC0415

    from service.trust.sealing import read_keys  # noqa: PLC0415

    try:
        click.echo(encoded(public_key_of(read_keys(str(key_file))[0])))
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)


@main.command("config")
@settings_options
def show_config(**options: Any) -> None:  # noqa: ANN401
    """Print the effective settings, every secret masked, and what follows from them (exit 2 if they are bad)."""
    from service.config import effective  # noqa: PLC0415

    environ = options_environ(options)
    settings = _settings_or_exit(environ)
    policy = _policy_or_exit(settings)
    instances = _instances_or_exit(settings) if settings.clerk_instances_file else None
    for name, shown, default in effective(settings):
        click.echo(f"{name}={shown}{'  # default' if default else ''}")
    for name, shown in tracing.shown_settings(environ):
        click.echo(f"{name}={shown}")
    if instances is None:
        click.echo(f"# rate limit: {settings.rate_limit} calls a {settings.clerk_rate_window_seconds:g} s window")
    else:
        click.echo(f"# clerk instances ({settings.clerk_instances_file}), each its own rate limit:")
        for instance in instances.values():
            click.echo(f"#   {instance.shown()}")
    click.echo(f"# calls to Clerk at once: {settings.concurrency}")
    click.echo(f"# rate limit and idempotency store: {'shared in Redis' if settings.redis_url else 'in this process'}")
    file = policy.file
    if policy.open:
        click.echo("# policy: none (anyone who can publish to the request queues is served)")
    elif settings.policy_file and file is not None:
        click.echo(
            f"# policy: {settings.policy_file}: {len(file.callers)} callers, "
            f"[defaults] {'set' if file.defaults else 'absent (others refused)'}, "
            f"{len(file.protected_users)} protected_users patterns"
        )
    else:
        click.echo("# policy: ALLOWED_PUBLISHERS (the listed publishers may ask for anything)")
    click.echo(f"# sealed replies: {_sealing_said(settings, policy)}")


def _sealing_said(settings: Settings, policy: Policy) -> str:
    """What ``config`` says of sealed replies: the key that seals, who is sealed, how answers are kept."""
    from sign_in_tokens_client.sealing import encoded  # noqa: PLC0415

    from service.trust.sealing import sealing_keys  # noqa: PLC0415

    try:
        public = sealing_keys(settings).public_key
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_CONFIG)
    in_redis = "in Redis, in clear" if settings.redis_url else "in process, encrypted"
    if public is None:
        return f"none (no REPLY_SEALING_KEY_FILE); idempotency answers {in_redis}"
    required = ", required of every caller" if policy.file is not None and policy.file.require_sealed else ""
    tables = f"{policy.sealed_tables} tables of the policy seal"
    return f"the worker's public key {encoded(public)}, {tables}{required}; answers encrypted"


def _opener_or_exit(private_key_file: Path | None, service_public_keys: tuple[str, ...]) -> ReplyOpener | None:
    """The opener of sealed replies the options give (both or neither), or one line on stderr and exit 2."""
    if private_key_file is None and not service_public_keys:
        return None
    if private_key_file is None or not service_public_keys:
        fail("--private-key-file and --service-public-key go together (sealed replies)", EXIT_CONFIG)
    from sign_in_tokens_client.sealing import ReplyOpener, SealingError, read_key_file  # noqa: PLC0415

    try:
        private = read_key_file(private_key_file)
    except OSError as exc:
        fail(f"--private-key-file: cannot read {private_key_file}: {exc.strerror}", EXIT_CONFIG)
    except SealingError as exc:
        fail(f"--private-key-file: {private_key_file}: {exc}", EXIT_CONFIG)
    try:
        return ReplyOpener(private, service_public_keys)
    except SealingError as exc:
        fail(f"--service-public-key: {exc}", EXIT_CONFIG)


def _instances_or_exit(settings: Settings) -> dict[str, Instance]:
    """The Clerk instances the settings give (CLERK_INSTANCES_FILE, else CLERK_SECRET_KEY's), or exit 2."""
    from service.clerk.instances import load_instances  # noqa: PLC0415

    try:
        return load_instances(settings, settings.clerk_instances_file)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_CONFIG)


def _policy_or_exit(settings: Settings) -> Policy:
    """The policy the settings give (POLICY_FILE read and checked), or one line on stderr and exit 2."""
    from service.trust.policy import policy_from_settings  # noqa: PLC0415

    try:
        return policy_from_settings(settings)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_CONFIG)


def _settings_or_exit(environ: dict[str, str]) -> Settings:
    """Settings from ``environ`` (see ``options_environ``), or one line on stderr and exit 2."""
    try:
        return configured(environ)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_CONFIG)
