"""Creating a sign-in token: ``POST /sign_in_tokens``, on the interactive and bulk lanes."""

from __future__ import annotations

from typing import Final

from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import (
    CreateSignInTokenRequestBody,
    Kind,
    decode_request,
    encode_clerk_body,
)

from service.config import Settings
from service.trust.policy import Policy


class CreateSignInToken:
    """A sign-in token for a user: its body in either spelling, JSON or MessagePack."""

    kind: Final[Kind] = "sign_in_token"

    def __init__(self, settings: Settings) -> None:
        """Decode within ``settings``' limits (body size, longest lifetime)."""
        self.settings = settings

    def decode(self, body: bytes, content_type: str | None) -> CreateSignInTokenRequestBody:
        """The request, strictly decoded."""
        return decode_request(
            body,
            content_type,
            max_expires_in_seconds=self.settings.max_expires_in_seconds,
            max_body_bytes=self.settings.max_body_bytes,
        )

    def admit(
        self, policy: Policy, caller: str | None, lane: Lane, request: CreateSignInTokenRequestBody
    ) -> CreateSignInTokenRequestBody:
        """The caller's rules: its lane, org_id, lifetime (filled in when absent), and no protected user."""
        return policy.admit(caller, lane, request)

    def clerk_body(self, request: CreateSignInTokenRequestBody) -> bytes:
        """Clerk's JSON body."""
        return encode_clerk_body(request)
