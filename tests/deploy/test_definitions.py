"""deploy/rabbitmq/definitions.json: generated from the code, the same as docs/security.md, and loadable by RabbitMQ."""

from __future__ import annotations

import json
from pathlib import Path

import aio_pika
import pytest

from service.amqp.definitions import AUDIT_ARCHIVE_MAX_BYTES, ROLES, VHOST, render
from service.amqp.topology import audit_archive_arguments, declared_queues
from service.config import Settings
from service.local.rabbitmq import LocalBroker
from tests.integration.test_permissions import permission_rows

DEFINITIONS = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"


def test_the_committed_file_is_the_generated_one() -> None:
    """Regenerate with `uv run python -m service.amqp.definitions > deploy/rabbitmq/definitions.json` when this fails."""
    assert DEFINITIONS.read_text(encoding="utf-8") == render()


def test_the_users_and_permissions_are_the_security_pages() -> None:
    assert permission_rows() == ROLES


async def test_rabbitmq_loads_it_and_the_workers_declarations_match_it(session_node: LocalBroker | None) -> None:
    """Imported into a broker, every queue accepts the worker's own declaration (different arguments would not)."""
    if session_node is None:
        pytest.skip("needs rabbitmqctl on the tests' own broker; AMQP_URL names another")
    await session_node.ctl("import_definitions", str(DEFINITIONS))
    await session_node.ctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    connection = await aio_pika.connect(session_node.url.rstrip("/") + f"/{VHOST}")
    try:
        channel = await connection.channel()
        settings = Settings()
        expected = {**declared_queues(settings), settings.audit_archive_queue: audit_archive_arguments(settings)}
        for name, arguments in expected.items():
            await channel.declare_queue(name, durable=True, arguments=arguments)  # PRECONDITION_FAILED if not equal
        await channel.declare_exchange("sign_in_tokens.audit", aio_pika.ExchangeType.TOPIC, durable=True)
        loaded = json.loads(DEFINITIONS.read_text())
        assert {q["name"] for q in loaded["queues"]} == set(expected)
        # A flood into the archive (any caller can publish to it by name) is bounded in bytes.
        applied = json.loads(
            await session_node.ctl("list_queues", "-p", VHOST, "--formatter", "json", "name", "policy")
        )
        policies = json.loads(await session_node.ctl("list_policies", "-p", VHOST, "--formatter", "json"))
        definitions = {p["name"]: json.loads(p["definition"]) for p in policies}
        policy = next(q["policy"] for q in applied if q["name"] == settings.audit_archive_queue)
        assert definitions[policy] == {"max-length-bytes": AUDIT_ARCHIVE_MAX_BYTES}
        # The archive is bound to every event: none is published into nothing.
        assert [(b["source"], b["destination"], b["routing_key"]) for b in loaded["bindings"]] == [
            ("sign_in_tokens.audit", "sign_in_tokens.audit.archive", "#")
        ]
    finally:
        await connection.close()
        users = ", ".join(f'<<"{user}">>' for user in ROLES)
        await session_node.ctl(
            "eval",
            f'rabbit_vhost:delete(<<"{VHOST}">>, <<"tests">>), '
            f'[rabbit_auth_backend_internal:delete_user(U, <<"tests">>) || U <- [{users}]].',
        )
