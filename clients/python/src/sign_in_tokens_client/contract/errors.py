"""The service's errors, each knowing its contract code and whether it is retryable.

The tree::

    ServiceError
    ├── ConfigError                 bad configuration: one line on stderr, exit 2
    └── RequestError                ends one request with a failed reply
        ├── InvalidRequestError     invalid_request (body, fields, headers)
        ├── ForbiddenError          forbidden (policy)
        ├── DeadlineExceededError   deadline_exceeded
        └── UpstreamError           Clerk was called
            ├── UserNotFoundError       user_not_found (404)
            ├── UpstreamRejectedError   upstream_rejected (other 4xx)
            ├── RateLimitedError        rate_limited (429; retryable)
            └── UpstreamUnavailableError upstream_unavailable (5xx, timeout, network; retryable)
                └── UpstreamMalformedError   upstream_unavailable: a 200 that is not a SignInToken
                                             (not retried: Clerk may have made a token)

    KeyRejectedError                Clerk answered 401: our key is wrong; not a
                                    request's failure, so it is outside the tree
                                    of replies and the worker pauses instead.
    ShutdownRequestedError          a signal, not a failure: the worker is stopping,
                                    so the request goes back to its queue.
    ClaimLostError (service.state.dedup)  another request took this request's idempotency key
                                    while it called Clerk (its lease ran out): the token it
                                    made is revoked, and it answers with the one stored.

Error texts never contain a sign-in token or the secret key: they are built
from Clerk's error messages and our own words only.
"""

from __future__ import annotations

import ssl
from typing import ClassVar


class ServiceError(Exception):
    """Base of every error this service raises on purpose."""


class ConfigError(ServiceError):
    """The configuration or environment cannot run the service."""


class RequestError(ServiceError):
    """One request ends in a ``failed`` reply with this error's code.

    The client library raises the same classes for a failed reply (``sign_in_tokens_client.client``, where
    this one is ``SignInTokenError``): there ``code`` and ``retryable`` are the reply's own.
    """

    code: str = "invalid_request"
    retryable: bool = False
    # Only these outcomes are remembered by the idempotency store.
    final: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        upstream_code: str | None = None,
        clerk_trace_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Record the error's text, what Clerk said, and its ``Retry-After`` (seconds)."""
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code
        self.clerk_trace_id = clerk_trace_id
        self.retry_after = retry_after
        # Upstream attempts made; set by the retry loop.
        self.attempts = 0


class InvalidRequestError(RequestError):
    """The body, a field or a header breaks the contract."""

    code = "invalid_request"


class ForbiddenError(RequestError):
    """The publisher may not ask for this."""

    code = "forbidden"


class DeadlineExceededError(RequestError):
    """``x-deadline`` passed before a token could be created."""

    code = "deadline_exceeded"


class UpstreamError(RequestError):
    """Clerk was called and did not give a token."""

    code = "upstream_unavailable"


class UserNotFoundError(UpstreamError):
    """Clerk answered 404: no such user."""

    code = "user_not_found"
    final = True


class UpstreamRejectedError(UpstreamError):
    """Clerk refused this request (400, 403, 422 or another 4xx)."""

    code = "upstream_rejected"
    final = True


class RateLimitedError(UpstreamError):
    """Clerk answered 429."""

    code = "rate_limited"
    retryable = True


class UpstreamUnavailableError(UpstreamError):
    """Clerk answered 5xx, timed out, or could not be reached."""

    code = "upstream_unavailable"
    retryable = True


class KeyRejectedError(ServiceError):
    """Clerk answered 401: the service's secret key is not accepted."""


class UpstreamMalformedError(UpstreamUnavailableError):
    """Clerk answered 200 with a body that is not a SignInToken; a token may exist all the same."""

    retryable = False

    def __init__(self, message: str, *, token_id: str | None, upstream_status: int) -> None:
        """Remember the token's id when the body names one, so it can be revoked."""
        super().__init__(message, upstream_status=upstream_status)
        self.token_id = token_id


# The class of each code a reply can carry.
BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        ForbiddenError,
        DeadlineExceededError,
        UserNotFoundError,
        UpstreamRejectedError,
        RateLimitedError,
        UpstreamUnavailableError,
    )
}


class ShutdownRequestedError(ServiceError):
    """The worker is stopping: return the request to its queue."""


def untrusted_certificate(exc: BaseException | None) -> str | None:
    """Why a TLS peer's certificate did not verify, when that is what ``exc`` (or an error under it) says."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return str(exc.verify_message or exc.reason or exc)
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return str(exc).split("certificate verify failed: ", 1)[-1].split(" (_ssl.c", 1)[0]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
