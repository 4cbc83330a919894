"""The operations the pipeline runs, one module each.

Each says how its body decodes, what the policy checks, which Clerk endpoint is called, and what
the reply carries. Two kinds. An operation that *issues* a token (``Issues``) is answered under its request's
idempotency key, with retries, deadlines and every token's fate kept by the pipeline
(``issuing.py``): it says only how to read, admit and ask for one token. An operation that
*answers* at once (``Answers``, a revocation) makes no token and is answered as it comes.

A new operation is a module here and its queue's entry in ``Pipeline.issues`` or
``Pipeline.answers``, beside its queue (a setting, ``contract.lanes.Source``,
``amqp.topology.lane_queue_names``) and its messages (``contract/``): docs/contributing.md. Today
issuing knows one kind of token (a ``Created`` reply, revoked at ``/sign_in_tokens``); a second
kind brings its reply and its revocation into this protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from sign_in_tokens_client.contract.lanes import Lane
    from sign_in_tokens_client.contract.messages import CreateSignInTokenRequestBody, Reply, SignInToken

    from service.amqp.envelope import Envelope
    from service.clerk.upstream import ClerkClient
    from service.trust.audit import Subject
    from service.trust.policy import Policy

RequestT = TypeVar("RequestT", bound="CreateSignInTokenRequestBody")


class Issues(Protocol[RequestT]):
    """An operation that makes a token for its request."""

    def decode(self, body: bytes, content_type: str | None) -> RequestT:
        """The request (UndecodableError: not an object; InvalidRequestError: a rule broken)."""
        ...

    def admit(self, policy: Policy, caller: str | None, lane: Lane, request: RequestT) -> RequestT:
        """The request as the caller's rules allow it (ForbiddenError, naming the rule)."""
        ...

    def clerk_body(self, request: RequestT) -> bytes:
        """What is sent to Clerk: also what a reused key's request is compared with."""
        ...

    async def call(self, clerk: ClerkClient, body: bytes, lane: Lane, deadline: float | None) -> SignInToken:
        """One call to Clerk that makes the token."""
        ...

    def reply(self, token: SignInToken) -> Reply:
        """The reply carrying the token."""
        ...


class Answers(Protocol):
    """An operation answered as it comes, making no token."""

    async def answer(self, body: bytes, envelope: Envelope, subject: Subject, policy: Policy) -> Reply:
        """The reply (UndecodableError, InvalidRequestError: the body is bad)."""
        ...
