"""The connection to the broker, as a caller and the service both open it, and the names on the wire both use."""

from __future__ import annotations

import asyncio
from typing import Final

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.exceptions import ProbableAuthenticationError
from yarl import URL

from sign_in_tokens_client.contract.errors import ConfigError, ServiceError, untrusted_certificate

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
# The reply header naming the requester (its validated user_id), which clients check against their own.
CALLER_HEADER: Final = "x-caller"
# The Clerk instance a request is for (contract v3): absent, the caller's default one, else this one.
INSTANCE_HEADER: Final = "x-clerk-instance"
DEFAULT_INSTANCE: Final = "default"
# Sealed replies (contract v3): a request's header naming the caller's public key its reply is sealed
# to, one of those its policy lists (two while the caller's key rolls); absent, the first listed.
REPLY_KEY_HEADER: Final = "x-reply-public-key"
# What an instance's name may be: a metric label, an audit field, part of a queue's name. The
# patterns end with (?![\s\S]), "nothing follows", in Python and in JSON Schema's ECMAScript
# alike: a `$` would let a trailing newline through in Python.
INSTANCE_NAME: Final = r"^[a-z0-9][a-z0-9_-]{0,31}(?![\s\S])"
_CONNECT_TIMEOUT_SECONDS: Final = 10.0
# aio-pika's default is 5 s; a lost broker is retried each second so consumption resumes sooner.
_RECONNECT_INTERVAL_SECONDS: Final = 1.0
# Everything a failed connection or channel can raise while we publish or ack.
CHANNEL_FAILURES: Final = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, asyncio.TimeoutError)
# aiormq's user when AMQP_URL names none (and logs in with a password).
_AMQP_DEFAULT_USER: Final = "guest"


class BrokerUnavailableError(ServiceError):
    """The broker could not be reached (within the start-up timeout, for the service)."""


def broker_address(url: str) -> str:
    """``host:port`` of an AMQP URL, safe to log (no credentials)."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


def broker_user(amqp_url: str, amqp_user: str | None = None) -> str:
    """The broker user an AMQP URL logs in as: the URL's, else ``amqp_user``, else aiormq's default.

    ``amqp_user`` (AMQP_USER) names the user only where the URL names none (``auth=external``, a
    client certificate): RabbitMQ refuses a ``user_id`` other than the connection's own.
    ConfigError when the URL logs in with ``auth=external`` and none is given.
    """
    url = URL(amqp_url)
    if url.user:
        return url.user
    if amqp_user:
        return amqp_user
    if url.query.get("auth", "").upper() == "EXTERNAL":
        msg = (
            "AMQP_USER: AMQP_URL logs in with auth=external (a client certificate): "
            "set AMQP_USER to the broker user it maps to"
        )
        raise ConfigError(msg)
    return _AMQP_DEFAULT_USER


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
