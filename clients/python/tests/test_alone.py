"""The client library imports nothing of the service, and none of the service's own dependencies."""

from __future__ import annotations

import subprocess
import sys

# What the service needs and a caller must not be made to install (or import).
SERVICE_ONLY = (
    "service",
    "structlog",
    "redis",
    "opentelemetry",
    "prometheus_client",
    "uvloop",
    "tqdm",
    "aiohttp",
    "click",
)


def test_importing_the_client_loads_nothing_of_the_service() -> None:
    code = (
        "import sys, sign_in_tokens_client\n"
        "from sign_in_tokens_client import SignInTokenClient, UserNotFoundError, Lane\n"
        "print('\\n'.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    loaded = subprocess.run(  # noqa: S603 - this interpreter, fixed code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [name for name in loaded if name in SERVICE_ONLY]
    assert "aio_pika" in loaded
    assert "msgspec" in loaded


def test_the_public_names_are_the_documented_ones() -> None:
    import sign_in_tokens_client  # noqa: PLC0415 - the import is what is tested

    assert {
        "SignInTokenClient",
        "SignInToken",
        "SignInTokenError",
        "NoReplyError",
        "ConnectionLostError",
        "Lane",
    } <= set(sign_in_tokens_client.__all__)


def test_the_user_in_the_url_wins_over_amqp_user() -> None:
    from sign_in_tokens_client.connection import broker_user  # noqa: PLC0415

    assert broker_user("amqp://billing:pw@rabbit/", "svc-worker") == "billing"
    assert broker_user("amqps://rabbit/?auth=external", "O=client,CN=billing") == "O=client,CN=billing"
    assert broker_user("amqp://rabbit/") == "guest"


def test_connection_failures_are_public_names() -> None:
    import sign_in_tokens_client  # noqa: PLC0415

    assert {"BrokerUnavailableError", "ConfigError"} <= set(sign_in_tokens_client.__all__)
