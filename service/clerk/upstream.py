"""ClerkClient: one aiohttp session to Clerk's Backend API, answers mapped to errors.

Made once at start-up and closed at shutdown. Every call has a connect and a
total timeout. A request's deadline does not shorten them: once a create is
sent, Clerk may make the token however soon we stop listening, so the worker
waits for the answer and revokes a token that comes too late.

The client also keeps Clerk's last word on the secret key: a 401 refutes
it; any other answer below 500 but 429 proves it (Clerk authenticates a call
before it looks at the body).

At shutdown (``stop_sending``) no call is sent any more: one waiting for
its rate slot or its turn raises ShutdownRequestedError at once (its request,
or its revocation order, goes back to its queue); one already sent runs to its
answer. A create cut after it may have left (a timeout after the connection
was made, a cancellation) is counted with ``on_cut``: Clerk may have made a
token nobody will hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Final
from urllib.parse import quote

import aiohttp
import msgspec
from opentelemetry.trace import SpanKind
from sign_in_tokens_client.connection import INSTANCE_HEADER
from sign_in_tokens_client.contract.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    KeyRejectedError,
    RateLimitedError,
    RequestError,
    ShutdownRequestedError,
    UpstreamMalformedError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
    UserNotFoundError,
)
from sign_in_tokens_client.contract.lanes import Lane, LaneGate
from sign_in_tokens_client.contract.messages import (
    ClerkErrors,
    Kind,
    Token,
    clerk_actor_token_decoder,
    clerk_errors_decoder,
    clerk_token_decoder,
)

from service import __version__, tracing
from service.clerk.instances import Instance
from service.clerk.ratelimit import ClerkRateLimiter, LimiterRetiredError
from service.config import Settings

Observe = Callable[[str, float], None]
# Each call's span, named once: nothing is built per call while tracing is off.
_SPAN_NAMES: Final = {op: f"clerk {op}" for op in ("create", "revoke", "probe")}
_POST: Final = MappingProxyType({"http.request.method": "POST"})
_JSON_HEADERS: Final = {"Content-Type": "application/json", "Accept": "application/json"}
# Failures that surely came before the request left: no connection was made.
_NOT_SENT: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Where each kind of token is made (and revoked, under ``/{id}/revoke``), and how Clerk's answer reads.
_PATHS: Final[dict[Kind, str]] = {"sign_in_token": "/sign_in_tokens", "actor_token": "/actor_tokens"}
_DECODERS: Final[dict[Kind, Callable[[bytes], Token]]] = {
    "sign_in_token": clerk_token_decoder.decode,
    "actor_token": clerk_actor_token_decoder.decode,
}
_NAMES: Final[dict[Kind, str]] = {"sign_in_token": "a SignInToken", "actor_token": "an ActorToken"}


class _TokenId(msgspec.Struct):
    """Enough of a malformed 200 to find the token it may describe."""

    id: str


_token_id_decoder = msgspec.json.Decoder(_TokenId)


def _token_id(body: bytes) -> str | None:
    try:
        return _token_id_decoder.decode(body).id
    except (msgspec.DecodeError, RecursionError):
        return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _clerk_errors(body: bytes) -> ClerkErrors:
    try:
        return clerk_errors_decoder.decode(body)
    except msgspec.DecodeError:
        return ClerkErrors()


def _error_class(status: int) -> type[RequestError]:
    if status == 404:
        return UserNotFoundError
    if status == 429:
        return RateLimitedError
    if 400 <= status < 500:
        return UpstreamRejectedError
    return UpstreamUnavailableError


def error_for(status: int, body: bytes, retry_after_header: str | None) -> RequestError | KeyRejectedError:
    """Map a non-200 answer from Clerk to the error it means."""
    if status == 401:
        return KeyRejectedError("Clerk rejected the secret key (401)")
    errors = _clerk_errors(body)
    first = errors.errors[0] if errors.errors else None
    return _error_class(status)(
        (first.message if first else "") or f"Clerk answered HTTP {status}",
        upstream_status=status,
        upstream_code=first.code if first and first.code else None,
        clerk_trace_id=errors.clerk_trace_id,
        retry_after=parse_retry_after(retry_after_header),
    )


def _limit_of(instance: Instance) -> tuple[int, float, str]:
    return instance.rate_limit, instance.rate_window_seconds, instance.state_id


class InstanceKeyRejectedError(KeyRejectedError):
    """Clerk answered 401 to one instance's key."""

    def __init__(self, instance: str) -> None:
        """Name the instance whose key Clerk rejected (never the key)."""
        super().__init__(f"Clerk rejected the secret key of instance {instance!r} (401)")
        self.instance = instance


class ClerkClient:
    """Creates and revokes tokens at Clerk: sign-in tokens, and actor tokens (impersonation)."""

    def __init__(
        self,
        settings: Settings,
        instance: Instance,
        observe: Observe | None = None,
        on_cut: Callable[[], None] | None = None,
        succeeds: ClerkClient | None = None,
    ) -> None:
        """Remember where and how to call ``instance``; the session is opened by ``start``.

        ``succeeds``: the client of the same instance before a SIGHUP (a rotated key, say). This one
        takes over its turns and, while the limit stays the same, its rate limiter: the calls
        still running there and the new ones count together.

        ``observe(operation, seconds)`` is told the latency of each call Clerk answered
        (``create``, ``revoke``, ``probe``), the wait for a rate slot not included.
        ``on_cut()`` is told of each create cut after it may have been sent.
        """
        self._observe = observe
        self._on_cut = on_cut
        self._sending = True
        self.instance = instance
        self._base = instance.api_url.rstrip("/")
        self._headers = {
            **_JSON_HEADERS,
            "Authorization": f"Bearer {instance.secret_key.reveal()}",
            "Clerk-API-Version": settings.clerk_api_version,
            "User-Agent": f"sign-in-token-service/{__version__}",
        }
        self._limit = settings.concurrency
        # Turns for calls in flight, interactive first: at most UPSTREAM_CONCURRENCY at once.
        self.gate: LaneGate = LaneGate(self._limit) if succeeds is None else succeeds.gate
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout_seconds, connect=settings.connect_timeout_seconds
        )
        # Clerk's last word on the key: None until it has said anything.
        self.key_accepted: bool | None = None
        # Replicas calling one instance share one limit in Redis, under its state id (never its key).
        self.limiter: ClerkRateLimiter
        if succeeds is not None and _limit_of(succeeds.instance) == _limit_of(instance):
            self.limiter = succeeds.limiter
            succeeds.limiter_handed_on = True
        else:
            self.limiter = ClerkRateLimiter(
                instance.rate_limit, instance.rate_window_seconds, settings.redis_url, instance.state_id
            )
        # Set once a successor took the limiter over: it is the successor's to close.
        self.limiter_handed_on: bool = False
        self._succeeds = succeeds
        self._removed = False
        # Once started, the client that took this one's place: a call still waiting here is sent through it.
        self._successor: ClerkClient | None = None

    async def start(self) -> None:
        """Open the one HTTP session; from then on, calls waiting in the client it succeeds are sent through it."""
        connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            raise_for_status=False,
        )
        if self._succeeds is not None:
            old, self._succeeds = self._succeeds, None
            old._successor = self  # noqa: SLF001 - one class's two instances
            if old.limiter is not self.limiter:  # a new limit: the calls waiting there wait here
                old.limiter.retire()

    def remove(self) -> None:
        """Its instance is gone (SIGHUP): the calls waiting for a slot are refused (invalid_request)."""
        self._removed = True
        self.limiter.retire()

    def _latest(self) -> ClerkClient:
        """The client a call sends through now: this one, or the last that took its place (a rotated key)."""
        client = self
        while client._successor is not None:
            client = client._successor
        return client

    def stop_sending(self) -> None:
        """Shutdown: start no call from now on."""
        self._sending = False
        self.limiter.stop()

    def _may_send(self) -> None:
        if not self._latest()._sending:  # noqa: SLF001 - one class's instances
            raise ShutdownRequestedError("shutting down")

    def _cut(self, operation: str) -> None:
        if operation == "create" and self._on_cut is not None:
            self._on_cut()

    async def close(self) -> None:
        """Close the session and its connections (and the rate limiter, unless a successor took it)."""
        if not self.limiter_handed_on:
            await self.limiter.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(
        self,
        operation: str,
        path: str,
        body: bytes,
        lane: Lane = Lane.INTERACTIVE,
        deadline: float | None = None,
    ) -> tuple[int, bytes, str | None]:
        """One call, once the rate limiter gives it a slot and the gate a turn (revokes and probes as interactive).

        The slot comes first: a request waiting under the rate limit holds no turn, so the turns
        (UPSTREAM_CONCURRENCY, the connections) are only ever held by calls about to be sent. A
        call is sent with the key in force when its turn comes: a SIGHUP's new key, if it came
        meanwhile (``_latest``).
        """
        self._may_send()
        if self._latest()._session is None:  # noqa: SLF001 - one class's instances
            msg = "ClerkClient.start() was not called"
            raise RuntimeError(msg)
        with tracing.span("rate slot"):
            await self._slot(lane, deadline)
        async with self.gate.turn(lane):
            self._may_send()
            if deadline is not None and time.time() >= deadline:
                msg = "x-deadline passed while the request waited for its turn"
                raise DeadlineExceededError(msg)
            sender = self._latest()
            session = sender._session  # noqa: SLF001 - one class's instances
            if session is None:  # closed at a stop
                raise ShutdownRequestedError("shutting down")
            started = time.perf_counter()
            with tracing.span(_SPAN_NAMES[operation], kind=SpanKind.CLIENT, attributes=_POST) as call:
                try:
                    async with session.post(sender._base + path, data=body) as response:  # noqa: SLF001
                        answer = response.status, await response.read(), response.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if not isinstance(exc, _NOT_SENT):
                        self._cut(operation)
                    # The exception's text may name our URL; its type is enough and safe.
                    msg = f"Clerk could not be reached: {type(exc).__name__}"
                    raise UpstreamUnavailableError(msg) from None
                except asyncio.CancelledError:
                    self._cut(operation)
                    raise
                if call is not None:
                    call.set_attribute("http.response.status_code", answer[0])
        if self._observe is not None:
            self._observe(operation, time.perf_counter() - started)
        sender._learn_key(answer[0])  # noqa: SLF001 - Clerk's word on the key that was sent
        return answer

    async def _slot(self, lane: Lane, deadline: float | None) -> None:
        """A slot under the limiter in force: a SIGHUP that changed the limit moves the wait to the new one."""
        while True:
            client = self._latest()
            try:
                await client.limiter.acquire(lane, deadline)
            except LimiterRetiredError:
                if client._removed:  # noqa: SLF001 - one class's instances
                    msg = f"{INSTANCE_HEADER}: there is no Clerk instance {client.instance.name!r} any more"
                    raise InvalidRequestError(msg) from None
                continue
            return

    def _learn_key(self, status: int) -> None:
        if status == 401:
            self.key_accepted = False
        elif status < 500 and status != 429:
            self.key_accepted = True

    async def create(self, kind: Kind, body: bytes, lane: Lane, deadline: float | None) -> Token:
        """Create a token of ``kind`` from an encoded request body; raise the error Clerk's answer means.

        The deadline bounds only the wait for a rate slot: a call once sent is not cut short.
        """
        return await self._token_call("create", kind, _PATHS[kind], body, lane, deadline)

    async def _token_call(
        self,
        operation: str,
        kind: Kind,
        path: str,
        body: bytes,
        lane: Lane = Lane.INTERACTIVE,
        deadline: float | None = None,
    ) -> Token:
        """One call answered with a token (``create`` or ``revoke``): the token of a 200, else the error it means.

        A 429 slows the limiter first. A create's answer must hold the token; a revocation's may
        leave it out (Clerk's spec), and a malformed one names nothing to revoke again.
        """
        status, answer, retry_after = await self._post(operation, path, body, lane, deadline)
        if status == 429:
            await self._latest().limiter.on_429(parse_retry_after(retry_after) or 1.0)
        if status == 401:
            raise InstanceKeyRejectedError(self.instance.name)
        if status != 200:
            raise error_for(status, answer, retry_after)
        creating = operation == "create"
        try:
            token = _DECODERS[kind](answer)
        except msgspec.DecodeError:
            token = None
        if token is None or (creating and not token.token):
            what = "" if creating else "the revocation "
            msg = f"Clerk answered {what}200 with a body that is not {_NAMES[kind]}"
            raise UpstreamMalformedError(msg, token_id=_token_id(answer) if creating else None, upstream_status=status)
        return token

    async def probe(self) -> bool:
        """Whether Clerk answers at all: a create it must refuse (422), so no token is made."""
        status, _, _ = await self._post("probe", "/sign_in_tokens", b"{}")
        return status < 500

    async def revoke(self, kind: Kind, token_id: str) -> Token:
        """Revoke a pending token; the token as Clerk returns it (status ``revoked``), or the error its answer means."""
        return await self._token_call("revoke", kind, f"{_PATHS[kind]}/{quote(token_id, safe='')}/revoke", b"")
