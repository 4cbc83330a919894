"""What the service declares on the broker: its queues (with the arguments the workers use), the audit exchange.

And the audit archive bound to every event: declared idempotently at start, again when deleted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from sign_in_tokens_client.connection import CHANNEL_FAILURES
from sign_in_tokens_client.contract.lanes import IMPERSONATE, REVOCATIONS, REVOKE, Lane, Source

from service.config import HoldKind, Settings

log = structlog.get_logger(__name__)


def lane_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of the two request queues: quorum, a delivery limit, dead-lettering."""
    return {
        "x-queue-type": "quorum",
        # RabbitMQ 3.x sets no default: without it a poison message loops forever.
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_letter_queue,
        # Broker-side dead-lettering (delivery limit) confirmed, not best effort.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def hold_queue_arguments(settings: Settings, kind: HoldKind) -> dict[str, Any]:
    """A hold queue's arguments: a request queue's, but for the orders to revoke (never dead-lettered)."""
    return {"x-queue-type": "quorum"} if kind == "revocations" else lane_queue_arguments(settings)


def hold_kind(source: Source) -> HoldKind:
    """Which of its instance's hold queues a request from ``source`` waits in."""
    if source == Lane.BULK:
        return "bulk"
    return "revocations" if source == REVOCATIONS else ""


def lane_queue_names(settings: Settings) -> dict[Source, str]:
    """The queue of each lane, of impersonations, of the callers' revocations and of the worker's own orders.

    What the worker consumes, and declares alike.
    """
    return {
        Lane.INTERACTIVE: settings.request_queue,
        Lane.BULK: settings.bulk_queue,
        IMPERSONATE: settings.impersonation_queue,
        REVOKE: settings.revoke_queue,
        REVOCATIONS: settings.revocations_queue,
    }


async def _declare(
    connection: AbstractRobustConnection,
    kind: str,
    name: str,
    declare: Callable[[AbstractRobustChannel], Awaitable[object]],
) -> None:
    """Declare one queue or exchange on a channel of its own (a refused declare closes its channel)."""
    channel = await connection.channel()
    try:
        await declare(channel)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        # It exists with other arguments (declared by an operator or an older
        # version): use it as it is rather than refuse to start.
        log.warning("exists_with_other_arguments", kind=kind, name=name)
    finally:
        with contextlib.suppress(*CHANNEL_FAILURES):
            await channel.close()


def _queue(name: str, arguments: dict[str, Any]) -> Callable[[AbstractRobustChannel], Awaitable[object]]:
    return lambda channel: channel.declare_queue(name, durable=True, arguments=arguments)


def audit_archive_arguments(settings: Settings) -> dict[str, Any]:
    """The audit archive's arguments: a stream that keeps events AUDIT_ARCHIVE_MAX_AGE."""
    return {"x-queue-type": "stream", "x-max-age": settings.audit_archive_max_age}


async def declare_audit_exchange(connection: AbstractRobustConnection, settings: Settings) -> None:
    """Declare the audit exchange (durable, topic) and, unless turned off, its archive bound to every event.

    Idempotent; called again after an event went unrouted (an operator may have deleted either).
    """
    name = settings.audit_exchange
    await _declare(
        connection,
        "exchange",
        name,
        lambda channel: channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True),
    )
    archive = settings.audit_archive
    if not archive:
        return

    async def declare_and_bind(channel: AbstractRobustChannel) -> None:
        queue = await channel.declare_queue(archive, durable=True, arguments=audit_archive_arguments(settings))
        await queue.bind(name, "#")

    await _declare(connection, "queue", archive, declare_and_bind)


def declared_queues(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every queue the worker declares, with its arguments (deploy/rabbitmq/definitions.json has the same)."""
    quorum = {"x-queue-type": "quorum"}
    found = {settings.dead_letter_queue: quorum, settings.results_queue: quorum}
    requests = {name: lane_queue_arguments(settings) for name in lane_queue_names(settings).values()}
    # An order to revoke is tried until Clerk has revoked the token: no delivery limit, nothing dead-lettered.
    return found | requests | {settings.revocations_queue: quorum}


async def declare_topology(connection: AbstractRobustConnection, settings: Settings) -> None:
    """Declare every queue the service uses, and the audit exchange; idempotent."""
    await declare_audit_exchange(connection, settings)
    await declare_queues(connection, declared_queues(settings))


async def declare_queues(connection: AbstractRobustConnection, queues: dict[str, dict[str, Any]]) -> None:
    """Declare each queue with its arguments; idempotent."""
    for name, arguments in queues.items():
        await _declare(connection, "queue", name, _queue(name, arguments))
