"""The stand-in Clerk's actor tokens answer as Clerk's: its OpenAPI schema, and the official SDK."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from clerk_backend_api import Clerk
from openapi_schema_validator import OAS30Validator

from service.local.fake_clerk import FakeClerk
from tests.conftest import SECRET_KEY
from tests.integration.test_fake_clerk import post

SPEC = yaml.safe_load((Path(__file__).parents[1] / "data" / "openapi-actor-tokens.yaml").read_text())
AGENT = {"sub": "user_agent_7"}


def validate(schema_name: str, body: object) -> None:
    """Raise unless ``body`` matches the spec's schema ``schema_name`` (references resolved)."""
    schema = {**SPEC["components"]["schemas"][schema_name], "components": SPEC["components"]}
    OAS30Validator(schema).validate(body)


def declared_statuses(path: str) -> set[int]:
    """The statuses the spec declares for POST ``path`` (401, 404, 429, 5xx are real but undeclared)."""
    return {int(s) for s in SPEC["paths"][path]["post"]["responses"]}


def claims(jwt: str) -> dict[str, Any]:
    """The payload of a JWT-shaped token."""
    payload = jwt.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user_id": "user_1", "actor": AGENT}, 200),
        ({"user_id": "user_1", "actor": {**AGENT, "email": "agent@example.com"}, "expires_in_seconds": 60}, 200),
        ({"user_id": "user_1", "actor": AGENT, "session_max_duration_in_seconds": 600}, 200),
        ({"user_id": "nobody", "actor": AGENT}, 404),
        ({"user_id": "user_1"}, 422),
        ({"user_id": "user_1", "actor": {"email": "agent@example.com"}}, 422),
        ({"user_id": "user_1", "actor": {"sub": 7}}, 422),
        ({"user_id": "user_1", "actor": AGENT, "expires_in_seconds": 0}, 422),
        ({"user_id": "user_1", "actor": AGENT, "org_id": "org_1"}, 422),
        ({"actor": AGENT}, 422),
    ],
)
async def test_create_answers_match_the_spec(fake_clerk: FakeClerk, body: dict[str, Any], status: int) -> None:
    """Each answer has the status Clerk gives and a body of the spec's schema; the actor is copied whole."""
    got_status, got_body = await post(fake_clerk, "/actor_tokens", body)
    assert got_status == status
    if status != 404:  # 404 for an unknown user is real but not in the spec's list
        assert got_status in declared_statuses("/actor_tokens")
    validate("ActorToken" if status == 200 else "ClerkErrors", got_body)
    if status == 200:
        assert (got_body["object"], got_body["status"], got_body["actor"]) == ("actor_token", "pending", body["actor"])
        assert got_body["id"].startswith("act_")
        assert claims(got_body["token"])["act"] == body["actor"]
        assert fake_clerk.actors.tokens[got_body["id"]] == got_body
        assert fake_clerk.stats.tokens == {}  # an actor token is not a sign-in token


async def test_the_plans_allowance_spent_is_402(fake_clerk: FakeClerk) -> None:
    """Two impersonations left: the third create is 402 (PaymentRequired, a ClerkErrors body), no token made."""
    fake_clerk.actors.impersonations_left = 2
    statuses = [(await post(fake_clerk, "/actor_tokens", {"user_id": "user_1", "actor": AGENT}))[0] for _ in range(3)]
    assert statuses == [200, 200, 402]
    _, body = await post(fake_clerk, "/actor_tokens", {"user_id": "user_1", "actor": AGENT})
    validate("ClerkErrors", body)
    assert 402 in declared_statuses("/actor_tokens")
    assert len(fake_clerk.actors.tokens) == 2


async def test_wrong_key_is_401_and_the_rate_limit_counts_actor_calls(fake_clerk: FakeClerk) -> None:
    """The key and the limit are the fake Clerk's, for actor tokens as for sign-in tokens."""
    status, body = await post(fake_clerk, "/actor_tokens", {"user_id": "user_1", "actor": AGENT}, key="sk_test_wrong")
    assert status == 401
    validate("ClerkErrors", body)
    fake_clerk.rate_limit = 1
    assert (await post(fake_clerk, "/sign_in_tokens", {"user_id": "user_1"}))[0] == 200
    assert (await post(fake_clerk, "/actor_tokens", {"user_id": "user_1", "actor": AGENT}))[0] == 429


async def test_revoke_answers_match_the_spec(fake_clerk: FakeClerk) -> None:
    """Revoke: 200 ActorToken `revoked`, then 400 (cannot be revoked), 404 for an unknown id, 401 for a wrong key."""
    _, token = await post(fake_clerk, "/actor_tokens", {"user_id": "user_1", "actor": AGENT})
    path = "/actor_tokens/{actor_token_id}/revoke"
    status, body = await post(fake_clerk, f"/actor_tokens/{token['id']}/revoke")
    assert status == 200
    assert status in declared_statuses(path)
    validate("ActorToken", body)
    assert body["status"] == "revoked"
    status, body = await post(fake_clerk, f"/actor_tokens/{token['id']}/revoke")
    assert status == 400
    validate("ClerkErrors", body)
    assert (await post(fake_clerk, "/actor_tokens/act_unknown/revoke"))[0] == 404
    assert (await post(fake_clerk, f"/actor_tokens/{token['id']}/revoke", key="sk_test_wrong"))[0] == 401
    assert fake_clerk.actors.revoked == {token["id"]}


async def test_official_sdk_creates_and_revokes_an_actor_token_against_the_fake(fake_clerk: FakeClerk) -> None:
    """clerk-backend-api pointed at the fake creates an actor token and revokes it."""
    async with Clerk(bearer_auth=SECRET_KEY, server_url=fake_clerk.url) as sdk:
        created = await sdk.actor_tokens.create_async(
            request={"user_id": "user_sdk", "actor": {"sub": "user_agent_sdk"}, "expires_in_seconds": 300}
        )
        assert (created.user_id, created.object.value if hasattr(created.object, "value") else created.object) == (
            "user_sdk",
            "actor_token",
        )
        assert created.token == fake_clerk.actors.tokens[created.id]["token"]
        revoked = await sdk.actor_tokens.revoke_async(actor_token_id=created.id)
        assert revoked.id == created.id
    assert fake_clerk.actors.revoked == {created.id}
