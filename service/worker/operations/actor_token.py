"""Impersonating a user: an actor token (``POST /actor_tokens``), on IMPERSONATION_QUEUE.

The session it opens names the impersonator (the ``actor``) in its ``act`` claim; who may
impersonate whom, as which actor, and for how long, is the policy's (``Policy.admit_actor``).
"""

from __future__ import annotations

from typing import Final

from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import (
    CreateActorTokenRequestBody,
    Kind,
    decode_actor_request,
    encode_clerk_body,
)

from service.config import Settings
from service.trust.policy import Policy


class CreateActorToken:
    """An actor token for a user, its actor named: the body in either spelling, JSON or MessagePack."""

    kind: Final[Kind] = "actor_token"

    def __init__(self, settings: Settings) -> None:
        """Decode within ``settings``' body size."""
        self.settings = settings

    def decode(self, body: bytes, content_type: str | None) -> CreateActorTokenRequestBody:
        """The request, strictly decoded (``actor.sub`` required; ``iss`` and ``sid`` are Clerk's)."""
        return decode_actor_request(body, content_type, max_body_bytes=self.settings.max_body_bytes)

    def admit(
        self, policy: Policy, caller: str | None, lane: Lane, request: CreateActorTokenRequestBody
    ) -> CreateActorTokenRequestBody:
        """The caller's impersonation rules: whom, as which actor, both lifetimes (filled in when absent)."""
        del lane  # always the interactive lane's
        return policy.admit_actor(caller, request)

    def clerk_body(self, request: CreateActorTokenRequestBody) -> bytes:
        """Clerk's JSON body."""
        return encode_clerk_body(request)
