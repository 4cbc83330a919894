"""Revoking a token at its caller's request: ``POST /sign_in_tokens/{id}/revoke`` or ``/actor_tokens/{id}/revoke``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sign_in_tokens_client.contract.errors import ForbiddenError, RequestError
from sign_in_tokens_client.contract.messages import ActorToken, Reply, decode_revoke, revoked

from service.logs import bind, token_field
from service.worker.delivery import failed

if TYPE_CHECKING:
    from service.amqp.envelope import Envelope
    from service.trust.audit import Subject
    from service.trust.policy import Policy
    from service.worker.parts import Parts
    from service.worker.revocations import Revocations


class RevokeToken:
    """Only the caller a token was given to may revoke it; anyone else is ``forbidden``."""

    def __init__(self, parts: Parts, revocations: Revocations) -> None:
        """Check grants in ``parts``; revoke through ``revocations``."""
        self.parts = parts
        self.revocations = revocations

    async def answer(self, body: bytes, envelope: Envelope, subject: Subject, policy: Policy) -> Reply:
        """Revoke the token for the caller it was given to (UndecodableError, InvalidRequestError: the body is bad)."""
        kind, token_id = decode_revoke(body, envelope.content_type, max_body_bytes=self.parts.settings.max_body_bytes)
        subject.kind = kind
        bind(**token_field(kind, token_id))
        envelope.deadline()  # checked as for a create; a revocation is never harmful late, so it is not cut short
        try:
            policy.may_revoke(envelope.publisher)
        except ForbiddenError as exc:
            return failed(exc)
        state = self.parts.state_id(subject.instance)
        if not await self.parts.grants.received_by(kind, token_id, envelope.publisher, state=state):
            what = "actor token" if kind == "actor_token" else "sign-in token"
            msg = f"{what} {token_id!r} was not given to this caller (or its record has expired)"
            return failed(ForbiddenError(msg))
        try:
            token = await self.revocations.at_clerk(subject, token_id)
        except RequestError as exc:
            return failed(exc)
        subject.user_id = token.user_id
        if isinstance(token, ActorToken):  # its impersonator, for the audit trail (not a secret)
            subject.actor = {key: str(value) for key, value in token.actor.items()}
        return revoked(token)
