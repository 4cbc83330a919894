"""The connection to the broker: opened with retries at start, robust afterwards (aio-pika restores it).

The errors a publish can end in, and whether a connection is blocked by a broker alarm, live here
too: every other module of the package uses them. Declaring is ``topology.py``'s, consuming
``consumers.py``'s, publishing ``publisher.py``'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import structlog
from aio_pika.abc import (
    AbstractRobustConnection,
)
from sign_in_tokens_client import wire as amqp_wire
from sign_in_tokens_client.connection import (
    DIRECT_REPLY_TO,
    BrokerUnavailableError,
    open_connection,
)
from sign_in_tokens_client.contract.errors import ServiceError

from service.config import Settings

amqp_wire.install()
log = structlog.get_logger(__name__)


# How often a slow confirm looks whether the connection is blocked: a block shorter than
# the confirm timeout must not count against it either.
BLOCKED_POLL_SECONDS: Final = 0.25


class ReplyRefusedError(ServiceError):
    """The broker returned the message as unroutable, or nacked it."""


class ReplyFateUnknownError(ServiceError):
    """The connection or channel failed before the broker confirmed the message."""


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """Open the robust connection, retrying with backoff for STARTUP_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + settings.startup_timeout_seconds
    delay = 0.25
    while True:
        try:
            return await open_connection(settings.amqp_url, name)
        except BrokerUnavailableError as exc:
            if time.monotonic() + delay > deadline:
                msg = f"{exc}, for {settings.startup_timeout_seconds:g} s"
                raise BrokerUnavailableError(msg) from None
            log.warning("broker_unreachable", reason=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def is_direct_reply_to(name: str) -> bool:
    """Whether ``name`` is a direct reply-to pseudo-queue."""
    return name.startswith(DIRECT_REPLY_TO)


def is_blocked(connection: AbstractRobustConnection) -> bool:
    """Whether the broker has blocked the connection (a resource alarm).

    aiormq tracks ``connection.blocked`` / ``unblocked`` in a private event
    (aiormq 7.2, pinned in pyproject.toml) and exposes it only through
    ``ready()``.
    """
    transport = connection.transport
    if transport is None:
        return False
    unblocked = getattr(transport.connection, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()
