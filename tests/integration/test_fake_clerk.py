"""The fake Clerk answers as Clerk does: its OpenAPI schema, and the official SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from clerk_backend_api import Clerk
from openapi_schema_validator import OAS30Validator

from service.local.fake_clerk import FakeClerk
from tests.conftest import SECRET_KEY

SPEC = yaml.safe_load((Path(__file__).parents[1] / "data" / "openapi-sign-in-tokens.yaml").read_text())


def validate(schema_name: str, body: object) -> None:
    """Raise unless ``body`` matches the spec's schema ``schema_name`` (references resolved)."""
    schema = {**SPEC["components"]["schemas"][schema_name], "components": SPEC["components"]}
    OAS30Validator(schema).validate(body)


def declared_statuses(path: str) -> set[int]:
    """The statuses the spec declares for POST ``path``."""
    return {int(s) for s in SPEC["paths"][path]["post"]["responses"]}


async def post(clerk: FakeClerk, path: str, body: Any = None, key: str = SECRET_KEY) -> tuple[int, Any]:
    """POST to the fake and return the status and decoded body."""
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http, http.post(clerk.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user_id": "user_1"}, 200),
        ({"user_id": "user_1", "expires_in_seconds": 60, "org_id": "org_1"}, 200),
        ({"user_id": "nobody"}, 404),
        ({"user_id": "user_1", "org_id": "acme"}, 403),
        ({"expires_in_seconds": 60}, 422),
        ({"user_id": "user_1", "expires_in_seconds": 0}, 422),
    ],
)
async def test_create_answers_match_the_spec(fake_clerk: FakeClerk, body: dict[str, Any], status: int) -> None:
    """Every create answer has a status the spec declares and a body of its schema."""
    got_status, got_body = await post(fake_clerk, "/sign_in_tokens", body)
    assert got_status == status
    assert got_status in declared_statuses("/sign_in_tokens")
    validate("SignInToken" if status == 200 else "ClerkErrors", got_body)


async def test_wrong_key_is_401_with_clerk_errors(fake_clerk: FakeClerk) -> None:
    """A wrong bearer key is answered 401 with a ClerkErrors body."""
    status, body = await post(fake_clerk, "/sign_in_tokens", {"user_id": "user_1"}, key="sk_test_wrong")
    assert status == 401
    validate("ClerkErrors", body)


async def test_rate_limit_answers_429_with_retry_after(fake_clerk: FakeClerk) -> None:
    """Past N requests in the window: 429, Retry-After in seconds, ResetsIn in the error's meta."""
    fake_clerk.rate_limit = 2
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(3):
            async with http.post(fake_clerk.url + "/sign_in_tokens", json={"user_id": "user_1"}, headers=headers) as r:
                statuses.append(r.status)
                last, retry_after = await r.json(), r.headers.get("Retry-After")
    assert statuses == [200, 200, 429]
    assert retry_after is not None
    assert 1 <= int(retry_after) <= 10
    validate("ClerkErrors", last)
    assert "ResetsIn" in last["errors"][0]["meta"]


async def test_each_key_has_its_own_window_and_may_have_its_own_limit(fake_clerk: FakeClerk) -> None:
    """Several Clerk instances, each its key: a call under one key never spends another's limit."""
    other = "sk_test_" + "o" * 24
    fake_clerk.accepted_keys.add(other)
    fake_clerk.rate_limit = 2
    fake_clerk.rate_limits[other] = 3
    statuses: dict[str, list[int]] = {SECRET_KEY: [], other: []}
    async with aiohttp.ClientSession() as http:
        for key in (SECRET_KEY, other):
            for _ in range(4):
                headers = {"Authorization": f"Bearer {key}"}
                async with http.post(
                    fake_clerk.url + "/actor_tokens", json={"user_id": "user_1", "actor": {"sub": "a"}}, headers=headers
                ) as r:
                    statuses[key].append(r.status)
    assert statuses == {SECRET_KEY: [200, 200, 429, 429], other: [200, 200, 200, 429]}
    assert (fake_clerk.stats.busiest_window(SECRET_KEY, 10), fake_clerk.stats.busiest_window(other, 10)) == (2, 3)


async def test_revoke_answers_match_the_spec(fake_clerk: FakeClerk) -> None:
    """Revoke: 200 SignInToken `revoked`, then 400 (cannot be revoked), 404 for an unknown id."""
    _, token = await post(fake_clerk, "/sign_in_tokens", {"user_id": "user_1"})
    path = "/sign_in_tokens/{sign_in_token_id}/revoke"
    for expected in (200, 400):
        status, body = await post(fake_clerk, f"/sign_in_tokens/{token['id']}/revoke")
        assert status == expected
        assert status in declared_statuses(path)
        validate("SignInToken" if status == 200 else "ClerkErrors", body)
    assert body["errors"][0]["code"] == "sign_in_token_cannot_be_revoked_code"
    status, body = await post(fake_clerk, "/sign_in_tokens/sit_unknown/revoke")
    assert status == 404


async def test_official_sdk_creates_and_revokes_against_the_fake(fake_clerk: FakeClerk) -> None:
    """clerk-backend-api pointed at the fake with server_url creates a token and revokes it."""
    async with Clerk(bearer_auth=SECRET_KEY, server_url=fake_clerk.url) as sdk:
        created = await sdk.sign_in_tokens.create_async(request={"user_id": "user_sdk", "expires_in_seconds": 300})
        assert (created.user_id, created.status.value if hasattr(created.status, "value") else created.status) == (
            "user_sdk",
            "pending",
        )
        assert created.token == fake_clerk.stats.tokens[created.id]["token"]
        revoked = await sdk.sign_in_tokens.revoke_async(sign_in_token_id=created.id)
        assert revoked.id == created.id
    assert fake_clerk.stats.revoked == {created.id}


async def test_the_rate_limit_is_a_sliding_window_and_counts_429s(fake_clerk: FakeClerk) -> None:
    """Two calls allowed per 0.6 s: a third just after a would-be bucket boundary is still refused."""
    fake_clerk.rate_limit = 2
    fake_clerk.rate_window_seconds = 0.6
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}

    async def create() -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.post(fake_clerk.url + "/sign_in_tokens", json={"user_id": "user_1"}, headers=headers) as r,
        ):
            return r.status

    assert await create() == 200
    await asyncio.sleep(0.4)  # wait-ok: the call's place in the window is the point
    assert await create() == 200
    await asyncio.sleep(0.3)  # wait-ok: past 0.6 s from the first call, within 0.6 s of the second
    assert [await create(), await create()] == [200, 429]
    assert fake_clerk.stats.rate_limited == 1
    assert fake_clerk.stats.busiest_window(SECRET_KEY, 0.6) == 2
