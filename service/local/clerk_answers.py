"""How the stand-in Clerk answers, for each of its APIs: JSON bodies, ClerkErrors, the tokens' JWTs."""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from aiohttp import web

PREFIX = "/v1"
# In the fake world a user exists when its id starts with this.
USER_PREFIX = "user_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(user_id: str, token_id: str, expires_in: int, *, act: dict[str, Any] | None = None) -> str:
    """A JWT-shaped token (RS256 header, random signature): the shape, not a real signature; ``act``: an actor's."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": "ins_fake"}
    payload: dict[str, Any] = {"sub": user_id, "sid": token_id, "iat": now, "nbf": now, "exp": now + expires_in}
    if act is not None:
        payload["act"] = act
    parts = (json.dumps(header).encode(), json.dumps(payload).encode(), secrets.token_bytes(256))
    return ".".join(_b64(p) for p in parts)


def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer as Clerk sends one."""
    return web.json_response(body, status=status, headers=headers)


def clerk_errors(code: str, message: str, long_message: str | None = None, **meta: Any) -> dict[str, Any]:  # noqa: ANN401
    """A ClerkErrors body."""
    error: dict[str, Any] = {"message": message, "long_message": long_message or message, "code": code}
    if meta:
        error["meta"] = meta
    return {"errors": [error], "clerk_trace_id": secrets.token_hex(16)}


def invalid_body(params: object, fields: frozenset[str]) -> dict[str, Any] | None:
    """A 422 body when a create body is no object, has a field not in ``fields``, or no ``user_id``."""
    if not isinstance(params, dict):
        return clerk_errors("form_param_missing", "user_id is missing", "user_id must be included")
    unknown = set(params) - fields
    if unknown:
        name = min(unknown)
        return clerk_errors("form_param_unknown", f"{name} is not a valid parameter", param_name=name)
    user_id = params.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        return clerk_errors(
            "form_param_missing", "user_id is missing", "user_id must be included", param_name="user_id"
        )
    return None


def invalid_seconds(params: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A 422 body when ``params[name]`` is given and is not a whole number of seconds, 1 or more."""
    value = params.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return clerk_errors("form_param_value_invalid", "is invalid", param_name=name)
    return None
