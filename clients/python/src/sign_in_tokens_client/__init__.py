"""Ask the sign-in token service for Clerk sign-in tokens over RabbitMQ.

    from sign_in_tokens_client import SignInTokenClient

    async with SignInTokenClient("amqp://billing:PASSWORD@rabbit/") as client:
        token = await client.create("user_123", expires_in_seconds=300)

``contract`` holds the wire's messages, error codes and lanes, shared with the service.
"""

from sign_in_tokens_client.client import *  # noqa: F403 - the library's public names, as its __all__ lists them
from sign_in_tokens_client.client import __all__  # noqa: F401 - re-exported: star imports and mypy read it
