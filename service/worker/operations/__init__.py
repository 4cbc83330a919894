"""The operations the pipeline runs, one module each.

Each says how its body decodes, what the policy checks, and what is sent to Clerk. Two kinds.
An operation that *issues* a token (``Issues``: a sign-in token, an actor token) is answered under
its request's idempotency key, with retries, deadlines and every token's fate kept by the pipeline
(``issuing.py``): it says only how to read and admit a request, which kind of token it makes
(Clerk's endpoint, its revocation and its reply follow from the kind), and the body Clerk gets. An
operation that *answers* at once (``Answers``, a revocation) makes no token and is answered as it comes.

A new operation is a module here and its queue's entry in ``Pipeline.issues`` or
``Pipeline.answers``, beside its queue (a setting, ``contract.lanes.Source``,
``amqp.topology.lane_queue_names``) and its messages (``contract/``): docs/contributing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

from sign_in_tokens_client.contract.messages import CreateActorTokenRequestBody, CreateSignInTokenRequestBody

if TYPE_CHECKING:
    from sign_in_tokens_client.contract.lanes import Lane
    from sign_in_tokens_client.contract.messages import Kind, Reply

    from service.amqp.envelope import Envelope
    from service.trust.audit import Subject
    from service.trust.policy import Policy

RequestT = TypeVar("RequestT", CreateSignInTokenRequestBody, CreateActorTokenRequestBody)


class Issues(Protocol[RequestT]):
    """An operation that makes a token for its request."""

    @property
    def kind(self) -> Kind:
        """The kind of token it makes: Clerk's endpoint, its revocation and the reply's field."""
        ...

    def decode(self, body: bytes, content_type: str | None) -> RequestT:
        """The request (UndecodableError: not an object; InvalidRequestError: a rule broken)."""
        ...

    def admit(self, policy: Policy, caller: str | None, lane: Lane, request: RequestT) -> RequestT:
        """The request as the caller's rules allow it (ForbiddenError, naming the rule)."""
        ...

    def clerk_body(self, request: RequestT) -> bytes:
        """What is sent to Clerk."""
        ...


class Answers(Protocol):
    """An operation answered as it comes, making no token."""

    async def answer(self, body: bytes, envelope: Envelope, subject: Subject, policy: Policy) -> Reply:
        """The reply (UndecodableError, InvalidRequestError: the body is bad)."""
        ...
