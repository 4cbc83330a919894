"""The client's calls wait alike: `request` takes `create`'s arguments, `request_impersonation` `impersonate`'s."""

from __future__ import annotations

import inspect

from sign_in_tokens_client.client import DEFAULT_TIMEOUT_SECONDS, SignInTokenClient


def test_create_request_and_revoke_wait_as_long_by_default() -> None:
    defaults = {
        name: inspect.signature(getattr(SignInTokenClient, name)).parameters["timeout"].default
        for name in ("create", "request", "impersonate", "request_impersonation", "revoke", "revoke_actor_token")
    }
    assert defaults == dict.fromkeys(defaults, DEFAULT_TIMEOUT_SECONDS)


def test_request_takes_exactly_create_s_arguments() -> None:
    create = inspect.signature(SignInTokenClient.create).parameters
    request = inspect.signature(SignInTokenClient.request).parameters
    assert [(p.name, p.default) for p in create.values()] == [(p.name, p.default) for p in request.values()]


def test_request_impersonation_takes_exactly_impersonate_s_arguments() -> None:
    impersonate = inspect.signature(SignInTokenClient.impersonate).parameters
    request = inspect.signature(SignInTokenClient.request_impersonation).parameters
    assert [(p.name, p.default) for p in impersonate.values()] == [(p.name, p.default) for p in request.values()]
