"""The stand-in Clerk's actor tokens (impersonation): ``POST /v1/actor_tokens`` and its revoke.

It answers as shared/clerk/ describes Clerk: an ActorToken (``object`` "actor_token", the
``actor`` object copied in whole, a JWT whose ``act`` claim is that object) or a ClerkErrors
body. The fake world of sign-in tokens holds here too: a wrong key is 401, a user exists when
its id starts with ``user_`` (else 404), a body that breaks the spec's schema is 422, and the rate
limit counts these calls with the others. ``impersonations_left`` stands for the plan's
allowance (free plans get 5 a month): at 0 a create is answered 402, as Clerk does.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from service.local.fake_clerk import FakeClerk

# Clerk's defaults when the body leaves them out (the spec's).
DEFAULT_EXPIRES_IN_SECONDS = 3_600
DEFAULT_SESSION_MAX_DURATION_SECONDS = 1_800
_FIELDS = frozenset({"user_id", "actor", "expires_in_seconds", "session_max_duration_in_seconds"})


class ActorTokens:
    """The actor-token endpoints of one fake Clerk, and what they made and revoked."""

    def __init__(self, clerk: FakeClerk) -> None:
        """Answer behind ``clerk``'s guard (faults, key, rate limit)."""
        self.clerk = clerk
        self.create_calls = 0
        self.revoke_calls = 0
        self.tokens: dict[str, dict[str, Any]] = {}
        self.revoked: set[str] = set()
        # What each create asked for (its session's longest life is not in the ActorToken).
        self.sessions_max_seconds: dict[str, int] = {}
        # The last create's body, as Clerk read it.
        self.last_params: dict[str, Any] | None = None
        # The plan's impersonation allowance: None, unlimited; 0, every create is 402.
        self.impersonations_left: int | None = None

    def add_routes(self, app: web.Application) -> None:
        """Serve the two endpoints on ``app``."""
        app.router.add_post(f"{PREFIX}/actor_tokens", self._create)
        app.router.add_post(f"{PREFIX}/actor_tokens/{{actor_token_id}}/revoke", self._revoke)

    async def _create(self, request: web.Request) -> web.Response:
        self.create_calls += 1
        refused, params = await self.clerk.create_body(request, _invalid_params, self._record_params)
        if refused is not None:
            return refused
        user_id: str = params["user_id"]
        if not user_id.startswith(USER_PREFIX):
            return reply(404, clerk_errors("resource_not_found", "not found", f"User {user_id} not found"))
        if self.impersonations_left is not None:
            if self.impersonations_left <= 0:
                message = "You have reached your plan's limit of impersonations"
                return reply(402, clerk_errors("payment_required", "Payment required", message))
            self.impersonations_left -= 1
        expires_in = params.get("expires_in_seconds") or DEFAULT_EXPIRES_IN_SECONDS
        token = self._issue(user_id, params["actor"], expires_in)
        session = params.get("session_max_duration_in_seconds") or DEFAULT_SESSION_MAX_DURATION_SECONDS
        self.sessions_max_seconds[token["id"]] = session
        return await self.clerk.answer_made(token)

    def _record_params(self, params: dict[str, Any] | None) -> None:
        self.last_params = params

    def _issue(self, user_id: str, actor: dict[str, Any], expires_in: int) -> dict[str, Any]:
        token_id = "act_" + secrets.token_hex(12)
        token = make_jwt(user_id, token_id, expires_in, act=actor)
        now_ms = int(time.time() * 1000)
        obj = {
            "object": "actor_token",
            "id": token_id,
            "status": "pending",
            "user_id": user_id,
            "actor": actor,
            "token": token,
            "url": f"https://accounts.fake-clerk.test/v1/tickets/accept?ticket={token}",
            "created_at": now_ms,
            "updated_at": now_ms,
        }
        self.tokens[token_id] = obj
        return obj

    async def _revoke(self, request: web.Request) -> web.Response:
        self.revoke_calls += 1
        obj = self.tokens.get(request.match_info["actor_token_id"])
        return self.clerk.revoke(request, obj, self.revoked, "actor_token_cannot_be_revoked")


def _invalid_params(params: object) -> dict[str, Any] | None:
    """A 422 body when the create body breaks the spec's schema, else None."""
    invalid = invalid_body(params, _FIELDS)
    if invalid is not None or not isinstance(params, dict):
        return invalid
    actor = params.get("actor")
    if not isinstance(actor, dict) or not isinstance(actor.get("sub"), str) or not actor["sub"]:
        return clerk_errors(
            "form_param_missing", "actor.sub is missing", "actor must include a sub", param_name="actor"
        )
    return invalid_seconds(params, "expires_in_seconds") or invalid_seconds(params, "session_max_duration_in_seconds")
