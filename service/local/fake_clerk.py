"""A stand-in for Clerk's sign-in token API, for tests, the demo and the benchmarks.

It answers as shared/clerk/ describes Clerk: ``POST /v1/sign_in_tokens``
and ``POST /v1/sign_in_tokens/{id}/revoke`` with a SignInToken or a
ClerkErrors body; actor tokens (impersonation) are ``fake_clerk_actors.py``'s,
behind the same key, faults and rate limit. Its fake world:

- a user exists when its id starts with ``user_``; others get 404;
- an ``org_id`` must start with ``org_``, else 403 (not a member);
- a missing or malformed field gets 422;
- a wrong bearer key gets 401.

Knobs: latency, a delay between making a token and answering with it (a
slow answer: the token exists at Clerk while the caller waits), a random 503
rate, faults queued for the next calls, and a rate limit of N calls (creates
and revokes, of both kinds) per key in every sliding window of
``rate_window_seconds`` (not fixed buckets, which a limiter could pass by luck
of alignment; a key may have a limit of its own, as several Clerk instances
do), answered 429 with ``Retry-After`` in whole seconds as Clerk sends it;
only the calls it accepts count. It records what it created and revoked, the
times of the calls it accepted and the 429s it sent, so tests and benchmarks
can count tokens and check the limit.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from service.local.clerk_answers import (
    PREFIX,
    USER_PREFIX,
    clerk_errors,
    invalid_body,
    invalid_seconds,
    make_jwt,
    reply,
)
from service.local.fake_clerk_actors import ActorTokens

_JSON = "application/json"
_ORG_PREFIX = "org_"


@dataclass
class Fault:
    """One queued answer: an HTTP status, optionally with ``Retry-After``, or a dropped connection."""

    status: int
    retry_after: float | None = None
    drop_connection: bool = False


@dataclass
class FakeClerkStats:
    """What the fake has seen and done."""

    create_calls: int = 0
    revoke_calls: int = 0
    # Monotonic time each create call arrived (answered or not).
    create_call_times: list[float] = field(default_factory=list)
    created_per_user: Counter[str] = field(default_factory=Counter)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    last_params: dict[str, Any] | None = None
    rate_limited: int = 0
    # Monotonic times of the calls accepted under the rate limit, per key.
    accepted_at: dict[str, list[float]] = field(default_factory=dict)
    # The same calls and the 429s, by the caller's User-Agent (to tell programs sharing a key apart).
    accepted_by_agent: dict[str, list[float]] = field(default_factory=dict)
    rate_limited_by_agent: Counter[str] = field(default_factory=Counter)

    def busiest_window(self, key: str, window_seconds: float, *more_keys: str) -> int:
        """The most calls accepted for ``key`` (and ``more_keys``, together) in any ``window_seconds``."""
        times = sorted(t for k in (key, *more_keys) for t in self.accepted_at.get(k, []))
        most, start = 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= window_seconds:
                start += 1
            most = max(most, end - start + 1)
        return most

    @property
    def created(self) -> int:
        """Tokens created."""
        return len(self.tokens)

    @property
    def duplicated(self) -> int:
        """Tokens created beyond the first for a user (each test request names its own user)."""
        return sum(n - 1 for n in self.created_per_user.values())


class FakeClerk:
    """The fake API server; construct, ``start``, point CLERK_API_URL at ``url``."""

    def __init__(
        self,
        secret_key: str,
        *,
        latency_seconds: float = 0.0,
        answer_delay_seconds: float = 0.0,
        error_rate: float = 0.0,
        rate_limit: int | None = None,
        rate_window_seconds: float = 10.0,
        seed: int | None = None,
    ) -> None:
        """A fake accepting ``secret_key``; the knobs may be changed while it runs."""
        self.accepted_keys = {secret_key}
        self.latency_seconds = latency_seconds
        # After a token is made, before it is answered: a caller that stops listening leaves it live.
        self.answer_delay_seconds = answer_delay_seconds
        self.error_rate = error_rate
        self.rate_limit = rate_limit
        self.rate_window_seconds = rate_window_seconds
        # A limit of its own for a key (several Clerk instances, each with its key): key -> calls a window.
        self.rate_limits: dict[str, int] = {}
        # Keys whose every call is answered 503: an outage of one instance, the others served.
        self.down_keys: set[str] = set()
        self.faults: deque[Fault] = deque()
        # Creates still to answer 200 with a body that is not a SignInToken (the token is made all the same).
        self.malformed_next = 0
        # Revocations answered without the token's secret (``token`` and ``url``: optional in Clerk's spec).
        self.revoke_without_secret = False
        # Awaited with each create's body before it is answered: a fault hook for tests.
        self.on_create: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self.stats = FakeClerkStats()
        # Actor tokens (impersonation): their own endpoints, records and allowance.
        self.actors = ActorTokens(self)
        self._random = random.Random(seed)  # noqa: S311 - fault injection, not crypto
        self._windows: dict[str, deque[float]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL to use as CLERK_API_URL."""
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def fail_next(self, status: int, count: int = 1, *, retry_after: float | None = None) -> None:
        """Answer the next ``count`` create calls with ``status``."""
        self.faults.extend(Fault(status, retry_after) for _ in range(count))

    def drop_next(self, count: int = 1) -> None:
        """Close the connection without an answer on the next ``count`` create calls."""
        self.faults.extend(Fault(0, drop_connection=True) for _ in range(count))

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application()
        app.router.add_post(f"{PREFIX}/sign_in_tokens", self._create)
        app.router.add_post(f"{PREFIX}/sign_in_tokens/{{token_id}}/revoke", self._revoke)
        self.actors.add_routes(app)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on ``host:port`` (0: a free port, then in ``self.port``)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - the OS-chosen port
        self.port = int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- request handling ----------------------------------------------------

    def key_of(self, request: web.Request) -> str | None:
        """The bearer key of ``request`` when the fake accepts it, else None."""
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip()
        return key if auth.startswith("Bearer ") and key in self.accepted_keys else None

    def _over_limit(self, key: str, agent: str) -> float | None:
        """Seconds until a call is accepted again when ``key`` is at the limit, else None (and the call counts)."""
        limit = self.rate_limits.get(key, self.rate_limit)
        if limit is None:
            return None
        now = time.monotonic()
        window = self._windows.setdefault(key, deque())
        while window and now - window[0] >= self.rate_window_seconds:
            window.popleft()
        if len(window) >= limit:
            self.stats.rate_limited += 1
            self.stats.rate_limited_by_agent[agent] += 1
            return window[0] + self.rate_window_seconds - now
        window.append(now)
        self.stats.accepted_at.setdefault(key, []).append(now)
        self.stats.accepted_by_agent.setdefault(agent, []).append(now)
        return None

    def limited(self, key: str, agent: str) -> web.Response | None:
        """A 429 when ``key`` is at its limit (the call then does not count)."""
        resets_in = self._over_limit(key, agent)
        if resets_in is None:
            return None
        body = clerk_errors("too_many_requests", "Too many requests", ResetsIn=round(resets_in, 3))
        return reply(429, body, {"Retry-After": str(max(1, math.ceil(resets_in)))})

    def _fault_response(self, fault: Fault, request: web.Request) -> web.Response:
        if fault.drop_connection:
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable
        headers = {"Retry-After": str(math.ceil(fault.retry_after))} if fault.retry_after is not None else None
        code = {429: "too_many_requests", 401: "authentication_invalid"}.get(fault.status, "internal_clerk_error")
        return reply(fault.status, clerk_errors(code, f"Injected fault {fault.status}"), headers)

    async def guard(self, request: web.Request) -> web.Response | None:
        """The answers that come before the body is looked at: faults, auth, limits."""
        if self.latency_seconds:
            await asyncio.sleep(self.latency_seconds)
        if self.faults:
            return self._fault_response(self.faults.popleft(), request)
        if self.down_keys and request.headers.get("Authorization", "").removeprefix("Bearer ") in self.down_keys:
            return reply(503, clerk_errors("service_unavailable", "Service unavailable"))
        refused = self.admit(request)
        if refused is not None:
            return refused
        if self.error_rate and self._random.random() < self.error_rate:
            return reply(503, clerk_errors("service_unavailable", "Service unavailable"))
        return None

    async def _create(self, request: web.Request) -> web.Response:
        self.stats.create_calls += 1
        self.stats.create_call_times.append(time.monotonic())
        refused, params = await self.create_body(request, _invalid_params, self._record_params)
        if refused is not None:
            return refused
        if self.on_create is not None:
            await self.on_create(params)
        user_id: str = params["user_id"]
        if not user_id.startswith(USER_PREFIX):
            return reply(404, clerk_errors("resource_not_found", "not found", f"User {user_id} not found"))
        org_id = params.get("org_id")
        if org_id is not None and not org_id.startswith(_ORG_PREFIX):
            return reply(403, clerk_errors("authorization_invalid", "Not a member of the organization"))
        return await self.answer_made(self._issue(user_id, params.get("expires_in_seconds") or 2_592_000))

    async def create_body(
        self,
        request: web.Request,
        invalid: Callable[[object], dict[str, Any] | None],
        record: Callable[[dict[str, Any] | None], None],
    ) -> tuple[web.Response | None, Any]:
        """A create's refusal, if any, and its body (None when it is not JSON).

        The refusals that come before the body (faults, key, limit), then the body, handed to
        ``record`` once read, and a 422 when ``invalid`` finds it wrong.
        """
        refused = await self.guard(request)
        if refused is not None:
            return refused, None
        try:
            params = await request.json()
        except ValueError:
            params = None
        record(params if isinstance(params, dict) else None)
        problem = invalid(params)
        return (None if problem is None else reply(422, problem)), params

    def _record_params(self, params: dict[str, Any] | None) -> None:
        self.stats.last_params = params

    async def answer_made(self, token: dict[str, Any]) -> web.Response:
        """The 200 of a token made: after ``answer_delay_seconds``; malformed (its id only) while ``malformed_next``."""
        if self.answer_delay_seconds:
            await asyncio.sleep(self.answer_delay_seconds)
        if self.malformed_next:
            self.malformed_next -= 1
            return reply(200, {"object": token["object"], "id": token["id"], "status": "pending"})
        return reply(200, token)

    def _issue(self, user_id: str, expires_in: int) -> dict[str, Any]:
        token_id = "sit_" + secrets.token_hex(12)
        token = make_jwt(user_id, token_id, expires_in)
        now_ms = int(time.time() * 1000)
        obj = {
            "object": "sign_in_token",
            "id": token_id,
            "status": "pending",
            "user_id": user_id,
            "token": token,
            "url": f"https://accounts.fake-clerk.test/v1/tickets/accept?ticket={token}",
            "created_at": now_ms,
            "updated_at": now_ms,
        }
        self.stats.tokens[token_id] = obj
        self.stats.created_per_user[user_id] += 1
        return obj

    async def _revoke(self, request: web.Request) -> web.Response:
        self.stats.revoke_calls += 1
        token_id = request.match_info["token_id"]
        return self.revoke(
            request, self.stats.tokens.get(token_id), self.stats.revoked, "sign_in_token_cannot_be_revoked_code"
        )

    def admit(self, request: web.Request) -> web.Response | None:
        """401 for a key the fake does not accept, 429 for one at its limit; None: the call counts."""
        key = self.key_of(request)
        if key is None:
            return reply(401, clerk_errors("authentication_invalid", "Invalid authentication"))
        return self.limited(key, request.headers.get("User-Agent", ""))

    def revoke(
        self, request: web.Request, obj: dict[str, Any] | None, revoked: set[str], cannot_code: str
    ) -> web.Response:
        """Revoke ``obj`` as Clerk does: 200 if pending, 400 (``cannot_code``) if not, 404 if unknown."""
        refused = self.admit(request)
        if refused is not None:
            return refused
        if obj is None:
            return reply(404, clerk_errors("resource_not_found", "not found"))
        if obj["status"] != "pending":
            return reply(400, clerk_errors(cannot_code, "cannot be revoked"))
        obj["status"] = "revoked"
        obj["updated_at"] = int(time.time() * 1000)
        revoked.add(obj["id"])
        if self.revoke_without_secret:
            return reply(200, {k: v for k, v in obj.items() if k not in {"token", "url"}})
        return reply(200, obj)


def _invalid_params(params: object) -> dict[str, Any] | None:
    """A 422 body when the create body breaks Clerk's schema, else None."""
    invalid = invalid_body(params, frozenset({"user_id", "expires_in_seconds", "org_id"}))
    if invalid is not None or not isinstance(params, dict):
        return invalid
    expires = invalid_seconds(params, "expires_in_seconds")
    org_id = params.get("org_id")
    if expires is None and org_id is not None and not isinstance(org_id, str):
        return clerk_errors("form_param_value_invalid", "is invalid", param_name="org_id")
    return expires


async def serve_forever(clerk: FakeClerk, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set (the CLI's ``fake-clerk``)."""
    await clerk.start(host, port)
    try:
        await stop.wait()
    finally:
        await clerk.stop()
