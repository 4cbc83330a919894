"""Settings from the environment: the one place every default lives.

Each field is read from the environment variable of the same name in upper
case (``amqp_url`` from ``AMQP_URL``), and each is also a command-line option
(``--amqp-url``). ``msgspec.convert(..., strict=False)`` turns the strings
into typed values; what fails is reported as one line naming the variable.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta
from sign_in_tokens_client.connection import broker_user
from sign_in_tokens_client.contract.errors import ConfigError
from sign_in_tokens_client.contract.lanes import BULK_QUEUE, IMPERSONATION_QUEUE, REQUEST_QUEUE, REVOKE_QUEUE
from sign_in_tokens_client.replies import DEFAULT_SERVICE_USER
from yarl import URL

from service.urls import MASK, _check_redis_parameters, check_clerk_url, check_tls, check_url, masked_url

QueueName = Annotated[str, Meta(min_length=1, max_length=255)]
# Which of a held Clerk instance's queues a request waits in: interactive work, bulk, or revocation orders.
HoldKind = Literal["", "bulk", "revocations"]
# Clerk's documented limits per 10 s: production and development instances.
LIVE_KEY_RATE_LIMIT = 1000
TEST_KEY_RATE_LIMIT = 100
# The slowest Clerk answer the default concurrency plans for (its usual latency is a tenth of it),
# and the fewest calls in flight it gives.
LATENCY_BUDGET_SECONDS = 2.0
MIN_CONCURRENCY = 32
# Time the shutdown keeps back from its grace period to close the connection, after calls already sent.
SHUTDOWN_MARGIN_SECONDS = 3.0
# The largest CONSUMER_TIMEOUT_SECONDS (RabbitMQ's consumer_timeout, 30 minutes by default).
CONSUMER_TIMEOUT_MAX = 24 * 3600


class Secret:
    """A value that must never be printed: its repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        """Hold ``value``."""
        self._value = value

    def reveal(self) -> str:
        """Return the value itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        """Masked."""
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        """The same value (a key read again, unchanged)."""
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]  # never a dict's key


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the service reads from its environment.

    ``frozen`` because settings are read once and shared; ``forbid_unknown_fields``
    so a field renamed in code cannot silently keep reading a stale name.
    """

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    # The broker user AMQP_URL logs in as, where the URL names none (EXTERNAL or OAuth 2 login):
    # the worker's replies carry it as their user_id, a client's requests as theirs.
    amqp_user: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    # The service's broker user: the request and bulk commands accept only replies it published.
    service_user: Annotated[str, Meta(min_length=1, max_length=255)] = DEFAULT_SERVICE_USER
    clerk_api_url: str = "https://api.clerk.com/v1"
    clerk_secret_key: Secret | None = None
    # Where the key was read from (read again at SIGHUP); None when CLERK_SECRET_KEY gives it.
    clerk_secret_key_file: str | None = None
    clerk_api_version: str = "2025-11-10"
    # None: from the key (Clerk's documented limits), see ``rate_limit``.
    clerk_rate_limit: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    clerk_rate_window_seconds: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    # Unset: the rate limit is this process's alone.
    redis_url: str | None = None
    request_queue: QueueName = REQUEST_QUEUE
    bulk_queue: QueueName = BULK_QUEUE
    impersonation_queue: QueueName = IMPERSONATION_QUEUE
    revoke_queue: QueueName = REVOKE_QUEUE
    # The worker's own: tokens made that nobody holds, each revoked at Clerk before its order is acked.
    revocations_queue: QueueName = "sign_in_tokens.revocations"
    results_queue: QueueName = "sign_in_tokens.results"
    dead_letter_queue: QueueName = "sign_in_tokens.dead"
    # With CLERK_INSTANCES_FILE: a held instance's requests wait in "<HOLD_QUEUE_PREFIX>.<instance>".
    hold_queue_prefix: Annotated[str, Meta(min_length=1, max_length=200)] = "sign_in_tokens.hold"
    http_host: str = "0.0.0.0"  # noqa: S104 - probes reach the pod on its own address
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    # Every number has an upper bound too: "inf" or 1e20 would defeat the bounds the docs promise.
    startup_timeout_seconds: Annotated[float, Meta(ge=0, le=3600)] = 60.0
    shutdown_grace_seconds: Annotated[float, Meta(gt=0, le=3600)] = 25.0
    max_attempts: Annotated[int, Meta(ge=1, le=50)] = 5
    max_expires_in_seconds: Annotated[int, Meta(ge=1, le=315_360_000)] = 2_592_000
    idempotency_window_seconds: Annotated[float, Meta(ge=0, le=7 * 86400)] = 600.0
    idempotency_max_bytes: Annotated[int, Meta(ge=0, le=2**40)] = 128 * 2**20
    # With REDIS_URL: how long a replica's claim on a message_id outlives its last renewal (every quarter of it).
    idempotency_lease_seconds: Annotated[float, Meta(ge=0.2, le=600)] = 5.0
    # Deliveries in a lane's hands: enough that Clerk's latency is not the cap (docs/configuration.md, Sizing).
    prefetch: Annotated[int, Meta(ge=1, le=65535)] = 200
    # None: enough that Clerk's latency never caps the rate limit, see ``concurrency``.
    upstream_concurrency: Annotated[int, Meta(ge=1, le=10_000)] | None = None
    connect_timeout_seconds: Annotated[float, Meta(gt=0, le=300)] = 3.0
    request_timeout_seconds: Annotated[float, Meta(gt=0, le=300)] = 10.0
    confirm_timeout_seconds: Annotated[float, Meta(gt=0, le=600)] = 30.0
    retry_base_seconds: Annotated[float, Meta(gt=0, le=60)] = 0.5
    retry_max_delay_seconds: Annotated[float, Meta(gt=0, le=600)] = 30.0
    delivery_limit: Annotated[int, Meta(ge=1, le=1_000_000)] = 10
    probe_max_interval_seconds: Annotated[float, Meta(gt=0, le=600)] = 30.0
    key_probe_hold_seconds: Annotated[float, Meta(gt=0, le=CONSUMER_TIMEOUT_MAX)] = 900.0
    outage_failure_threshold: Annotated[int, Meta(ge=1, le=1_000_000)] = 10
    outage_hold_seconds: Annotated[float, Meta(gt=0, le=CONSUMER_TIMEOUT_MAX)] = 300.0
    consumer_timeout_seconds: Annotated[float, Meta(gt=0, le=CONSUMER_TIMEOUT_MAX)] = 1800.0
    max_body_bytes: Annotated[int, Meta(ge=1, le=128 * 2**20)] = 65_536
    allowed_publishers: str = ""
    # Who may ask for what (contract v2); unset: ALLOWED_PUBLISHERS' short form, or anyone.
    policy_file: str | None = None
    # The worker's X25519 key for sealed replies (contract v3): 32 bytes, raw or base64.
    reply_sealing_key_file: str | None = None
    # Several Clerk instances (contract v3); unset: CLERK_SECRET_KEY's, named ``default``.
    clerk_instances_file: str | None = None
    # A durable topic exchange: an event for every outcome, routed to a queue and confirmed before the request is acked.
    audit_exchange: QueueName = "sign_in_tokens.audit"
    # A stream the worker declares and binds to every event (#), so none is published into nothing;
    # "none": the operator binds an archive of its own (until one is bound, requests are held).
    audit_archive_queue: QueueName = "sign_in_tokens.audit.archive"
    # How long the archive keeps events (RabbitMQ's x-max-age: Y, M, D, h, m, s).
    audit_archive_max_age: Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,5}[YMDhms](?![\s\S])")] = "30D"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def rate_limit(self) -> int:
        """Calls to Clerk per window: CLERK_RATE_LIMIT, else Clerk's limit for the key's kind."""
        if self.clerk_rate_limit is not None:
            return self.clerk_rate_limit
        return key_rate_limit(self.clerk_secret_key.reveal() if self.clerk_secret_key is not None else "")

    @property
    def concurrency(self) -> int:
        """Calls to Clerk at once: UPSTREAM_CONCURRENCY, else Little's law with a margin.

        The rate limit's calls a second times the slowest answer planned for
        (LATENCY_BUDGET_SECONDS): at that latency the limit, not the calls in flight, is the cap.
        At least MIN_CONCURRENCY; at most the requests the worker can hold (both lanes' prefetch).
        """
        if self.upstream_concurrency is not None:
            return self.upstream_concurrency
        needed = math.ceil(self.rate_limit / self.clerk_rate_window_seconds * LATENCY_BUDGET_SECONDS)
        return min(max(needed, MIN_CONCURRENCY), 2 * self.prefetch)

    @property
    def longest_hold_seconds(self) -> float:
        """The longest a request can stay unacknowledged in the worker: its attempts and an outage."""
        attempt = self.request_timeout_seconds + self.retry_max_delay_seconds
        return self.max_attempts * attempt + self.outage_hold_seconds

    @property
    def publishers(self) -> frozenset[str]:
        """The publishers (validated AMQP ``user_id``) allowed to ask; empty: anyone."""
        return frozenset(p.strip() for p in self.allowed_publishers.split(",") if p.strip())

    @property
    def audit_archive(self) -> str | None:
        """The archive the worker declares and binds, or None (AUDIT_ARCHIVE_QUEUE=none)."""
        return None if self.audit_archive_queue == "none" else self.audit_archive_queue

    @property
    def own_queues(self) -> frozenset[str]:
        """The service's own queues: never a reply's destination (a token in the audit trail, say)."""
        queues = (
            self.request_queue,
            self.bulk_queue,
            self.impersonation_queue,
            self.revoke_queue,
            self.revocations_queue,
            self.dead_letter_queue,
            self.audit_archive,
        )
        return frozenset(queue for queue in queues if queue)

    def hold_queue(self, instance: str, kind: HoldKind = "") -> str:
        """The queue a held Clerk instance's requests of ``kind`` wait in (the service's own too).

        ``""``: interactive work (the interactive lane, impersonations, callers' revocations);
        ``bulk``: the bulk lane's; ``revocations``: the workers' own orders (never dead-lettered).
        """
        return f"{self.hold_queue_prefix}.{instance}" + (f".{kind}" if kind else "")

    def is_hold_queue(self, name: str) -> bool:
        """Whether ``name`` is a held Clerk instance's queue."""
        return name.startswith(f"{self.hold_queue_prefix}.")

    def is_own_queue(self, name: str) -> bool:
        """Whether ``name`` is one of the service's queues (a hold queue included): never a reply's destination."""
        return name in self.own_queues or self.is_hold_queue(name)

    @property
    def broker_user(self) -> str:
        """The broker user this process publishes as (RabbitMQ checks a message's user_id against it)."""
        return broker_user(self.amqp_url, self.amqp_user)

    def secret_key(self) -> str:
        """Return the Clerk key, or raise ConfigError when none was given."""
        if self.clerk_secret_key is None:
            msg = "CLERK_SECRET_KEY or CLERK_SECRET_KEY_FILE is required"
            raise ConfigError(msg)
        return self.clerk_secret_key.reveal()


def key_rate_limit(key: str) -> int:
    """Clerk's documented limit for a key's kind: a production key's, else a development key's."""
    return LIVE_KEY_RATE_LIMIT if key.startswith("sk_live_") else TEST_KEY_RATE_LIMIT


def check_key(name: str, key: str) -> None:
    """ConfigError unless ``key`` is a key: printable ASCII without spaces (``name`` says where it came from)."""
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key) or len(key) > 512:
        msg = f"{name}: must be a non-empty key without spaces (printable ASCII, at most 512 characters)"
        raise ConfigError(msg)


def masked_key(key: Secret) -> str:
    """A Clerk key's kind (``sk_live_``, ``sk_test_``) and a mask for the rest."""
    value = key.reveal()
    kind = value[: value.find("_", 3) + 1] if value.startswith("sk_") else ""
    return kind + MASK


def effective(settings: Settings) -> list[tuple[str, str, bool]]:
    """Every setting as ``(VARIABLE, value shown, whether it is the default)``, secrets masked."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(Settings)}
    rows = []
    for field in FIELDS:
        value = getattr(settings, field)
        if isinstance(value, Secret):
            shown = masked_key(value)
        elif field in _URL_FIELDS and isinstance(value, str):
            shown = masked_url(value)
        else:
            shown = "" if value is None else str(value)
        rows.append((env_name(field), shown, value == defaults[field]))
    return rows


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return field.upper()


FIELDS: tuple[str, ...] = Settings.__struct_fields__
# The settings that are URLs: every credential in them is masked when they are shown.
_URL_FIELDS: Final = frozenset({"amqp_url", "redis_url", "clerk_api_url"})


def _dec_hook(type_: type, obj: Any) -> Any:  # noqa: ANN401 - msgspec's hook signature
    if type_ is Secret and isinstance(obj, str):
        return Secret(obj)
    raise NotImplementedError


def read_key_file(path: str, name: str = "CLERK_SECRET_KEY_FILE") -> str:
    """The key in the file at ``path`` (``name`` says which setting named it), surrounding whitespace dropped."""
    try:
        # A byte-order mark (a Windows editor's) is not part of the key.
        return Path(path).read_text(encoding="utf-8").strip().removeprefix("\ufeff").strip()
    except UnicodeDecodeError:
        msg = f"{name}: {path} is not UTF-8 text"
        raise ConfigError(msg) from None
    except ValueError:
        msg = f"{name}: not a path a file can have"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"{name}: cannot read {path}: {exc.strerror}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            uid = os.geteuid()
            msg += f" (this process runs as uid {uid}: give it the file, e.g. chown {uid} FILE && chmod 0400 FILE)"
        raise ConfigError(msg) from None


def _raw_values(environ: Mapping[str, str]) -> dict[str, str]:
    raw = {f: environ[env_name(f)] for f in FIELDS if environ.get(env_name(f), "") != ""}
    if "clerk_secret_key" in raw:  # the key itself wins over a file
        raw.pop("clerk_secret_key_file", None)
    elif "clerk_secret_key_file" in raw:
        raw["clerk_secret_key"] = read_key_file(raw["clerk_secret_key_file"])
    return raw


_PATH = re.compile(r" - at `\$\.(\w+)`")


def _config_error(exc: msgspec.ValidationError) -> ConfigError:
    text = str(exc)
    match = _PATH.search(text)
    if match is None:
        return ConfigError(text)
    return ConfigError(f"{env_name(match.group(1))}: {text[: match.start()]}")


def _check_http_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            msg = f"HTTP_HOST: {host!r} is neither an IP address nor a name that resolves"
            raise ConfigError(msg) from None


_QUEUE_FIELDS: Final = (
    "request_queue",
    "bulk_queue",
    "impersonation_queue",
    "revoke_queue",
    "revocations_queue",
    "results_queue",
    "dead_letter_queue",
)


def _check_grace(settings: Settings) -> None:
    """The grace period must cover one Clerk call: one cut short would leave its token with nobody."""
    needed = settings.request_timeout_seconds + SHUTDOWN_MARGIN_SECONDS
    if settings.shutdown_grace_seconds < needed:
        msg = (
            f"SHUTDOWN_GRACE_SECONDS ({settings.shutdown_grace_seconds:g}) must be at least "
            f"REQUEST_TIMEOUT_SECONDS ({settings.request_timeout_seconds:g}) + {SHUTDOWN_MARGIN_SECONDS:g}: "
            "a call to Clerk already sent is waited for at shutdown"
        )
        raise ConfigError(msg)


def _check_holds(settings: Settings) -> None:
    """Every hold must end before the broker's consumer timeout takes the channel."""
    limit = settings.consumer_timeout_seconds
    hold = settings.longest_hold_seconds
    if hold >= limit:
        msg = (
            f"OUTAGE_HOLD_SECONDS: a request could be held {hold:,.0f} s (MAX_ATTEMPTS x (REQUEST_TIMEOUT_SECONDS "
            f"+ RETRY_MAX_DELAY_SECONDS) + OUTAGE_HOLD_SECONDS), not under CONSUMER_TIMEOUT_SECONDS ({limit:,.0f} s)"
        )
        raise ConfigError(msg)
    if settings.key_probe_hold_seconds >= limit:
        msg = f"KEY_PROBE_HOLD_SECONDS: must be under CONSUMER_TIMEOUT_SECONDS ({limit:,.0f} s)"
        raise ConfigError(msg)


def _check_queues_distinct(settings: Settings) -> None:
    """Each queue the service uses is its own: one shared by two would mix their messages."""
    seen: dict[str, str] = {}
    for field in _QUEUE_FIELDS:
        name = getattr(settings, field)
        if name in seen:
            msg = f"{env_name(field)}: {name!r} is already {env_name(seen[name])}; each queue needs a name of its own"
            raise ConfigError(msg)
        seen[name] = field
    for name, field in seen.items():
        if settings.is_hold_queue(name) or name == settings.hold_queue_prefix:
            msg = (
                f"HOLD_QUEUE_PREFIX: {settings.hold_queue_prefix!r} would name hold queues like "
                f"{env_name(field)} ({name!r}); give the hold queues a prefix of their own"
            )
            raise ConfigError(msg)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build Settings from ``environ``; raise ConfigError with one clear line."""
    try:
        settings = msgspec.convert(_raw_values(environ), Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _config_error(exc) from None
    check_url("AMQP_URL", settings.amqp_url, ("amqp", "amqps"))
    check_tls("AMQP_URL", settings.amqp_url)
    broker_user(settings.amqp_url, settings.amqp_user)
    check_url("CLERK_API_URL", settings.clerk_api_url, ("http", "https"))
    check_clerk_url(settings.clerk_api_url)
    if settings.redis_url is not None:
        check_url("REDIS_URL", settings.redis_url, ("redis", "rediss"))
        check_tls("REDIS_URL", settings.redis_url)
        _check_redis_parameters(URL(settings.redis_url))
    if settings.clerk_secret_key is not None:
        check_key("CLERK_SECRET_KEY", settings.clerk_secret_key.reveal())
    _check_http_host(settings.http_host)
    _check_grace(settings)
    _check_holds(settings)
    _check_queues_distinct(settings)
    if settings.policy_file and settings.publishers:
        msg = "ALLOWED_PUBLISHERS: cannot be used with POLICY_FILE; list those callers under [callers] in the file"
        raise ConfigError(msg)
    return settings
