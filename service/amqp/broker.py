"""The connection to the broker: opened with retries at start, robust afterwards (aio-pika restores it).

The errors a publish can end in, and whether a connection is blocked by a broker alarm, live here
too: every other module of the package uses them. Declaring is ``topology.py``'s, consuming
``consumers.py``'s, publishing ``publisher.py``'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.exceptions import ProbableAuthenticationError
from yarl import URL

from service.amqp import wire as amqp_wire
from service.config import Settings
from service.contract.errors import ConfigError, ServiceError, untrusted_certificate

amqp_wire.install()
log = structlog.get_logger(__name__)

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
# The reply header naming the requester (its validated user_id), which clients check against their own.
CALLER_HEADER: Final = "x-caller"
# How often a slow confirm looks whether the connection is blocked: a block shorter than
# the confirm timeout must not count against it either.
BLOCKED_POLL_SECONDS: Final = 0.25
_CONNECT_TIMEOUT_SECONDS: Final = 10.0
# aio-pika's default is 5 s; a lost broker is retried each second so consumption resumes sooner.
_RECONNECT_INTERVAL_SECONDS: Final = 1.0
# Everything a failed connection or channel can raise while we publish or ack.
CHANNEL_FAILURES: Final = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, asyncio.TimeoutError)


class BrokerUnavailableError(ServiceError):
    """The broker could not be reached within the start-up timeout."""


class ReplyRefusedError(ServiceError):
    """The broker returned the message as unroutable, or nacked it."""


class ReplyFateUnknownError(ServiceError):
    """The connection or channel failed before the broker confirmed the message."""


def broker_address(url: str) -> str:
    """``host:port`` of an AMQP URL, safe to log (no credentials)."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


async def open_connection(url: str, name: str) -> AbstractRobustConnection:
    """Open a robust connection (one attempt); BrokerUnavailableError says why not, without credentials."""
    address = broker_address(url)
    try:
        return await aio_pika.connect_robust(
            url,
            client_properties={"connection_name": name},
            timeout=_CONNECT_TIMEOUT_SECONDS,
            reconnect_interval=_RECONNECT_INTERVAL_SECONDS,
        )
    except ProbableAuthenticationError:
        msg = f"the broker at {address} refused the credentials in AMQP_URL"
        raise BrokerUnavailableError(msg) from None
    except (*CHANNEL_FAILURES, RuntimeError) as exc:
        reason = untrusted_certificate(exc)
        if reason is not None:  # fail closed, at once: waiting will not make the certificate trusted
            msg = f"AMQP_URL: the certificate of the broker at {address} did not verify ({reason}); check cafile"
            raise ConfigError(msg) from None
        msg = f"cannot reach the broker at {address} ({type(exc).__name__})"
        raise BrokerUnavailableError(msg) from None


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
