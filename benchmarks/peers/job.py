"""What every peer does to one request, written once: the same structs and codecs as the service.

A peer reads AMQP_URL, REQUEST_QUEUE, CLERK_API_URL and CLERK_SECRET_KEY as
the service does, decodes a request into ``CreateSignInTokenRequestBody``,
POSTs it to Clerk, decodes Clerk's ``SignInToken`` and encodes the reply the
contract's way. No deadline, idempotency, lanes, rate limit, retries,
metrics or logs: the least a worker can do and still answer.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import msgspec
from sign_in_tokens_client.contract.messages import Created, CreateSignInTokenRequestBody, SignInToken

PREFETCH = 256

_request = msgspec.json.Decoder(CreateSignInTokenRequestBody)
_token = msgspec.json.Decoder(SignInToken)
_encoder = msgspec.json.Encoder()


class Settings(msgspec.Struct, frozen=True):
    """Where a peer connects."""

    amqp_url: str
    queue: str
    clerk_url: str
    secret_key: str

    @classmethod
    def from_env(cls) -> Settings:
        """The service's variables."""
        return cls(
            os.environ["AMQP_URL"],
            os.environ["REQUEST_QUEUE"],
            os.environ["CLERK_API_URL"].rstrip("/") + "/sign_in_tokens",
            os.environ["CLERK_SECRET_KEY"],
        )


def session(settings: Settings) -> aiohttp.ClientSession:
    """One HTTP session to Clerk."""
    return aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {settings.secret_key}", "Content-Type": "application/json"},
    )


async def create(http: aiohttp.ClientSession, settings: Settings, body: bytes) -> bytes:
    """Decode the request, call Clerk, return the encoded reply."""
    request = _request.decode(body)
    async with http.post(settings.clerk_url, data=_encoder.encode(request)) as response:
        answer = await response.read()
    return _encoder.encode(Created(sign_in_token=_token.decode(answer)))


async def until_terminated() -> None:
    """Wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
