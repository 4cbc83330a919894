"""deploy/rabbitmq/definitions.json: generated from the code, the same as docs/security.md, and loadable by RabbitMQ."""

from __future__ import annotations

import json
from pathlib import Path

import aio_pika
import pytest

from service.broker import audit_archive_arguments, declared_queues
from service.config import Settings
from service.definitions import ROLES, VHOST, render
from service.local_broker import LocalBroker
from tests.integration.test_permissions import permission_rows

DEFINITIONS = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"


def test_the_committed_file_is_the_generated_one() -> None:
    """Regenerate with `uv run python -m service.definitions > deploy/rabbitmq/definitions.json` when this fails."""
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
