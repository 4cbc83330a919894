"""Who may ask for a token.

The publisher is the AMQP ``user_id`` property, which RabbitMQ validates
against the connection's user. With ``ALLOWED_PUBLISHERS`` set, only those
publishers are served; a request from anyone else (or with no ``user_id``)
is answered ``forbidden`` without calling Clerk. Empty means anyone who can
publish to the queue may ask (the broker's permissions are then the policy).
"""

from __future__ import annotations

from service.errors import ForbiddenError
from service.messages import CreateSignInTokenRequestBody


class Policy:
    """The authorisation check between decoding and the upstream call."""

    def __init__(self, allowed_publishers: frozenset[str]) -> None:
        """Allow these publishers; an empty set allows every publisher."""
        self._allowed = allowed_publishers

    def check(self, publisher: str | None, request: CreateSignInTokenRequestBody) -> None:
        """Raise ForbiddenError when ``publisher`` may not ask for ``request``."""
        del request  # per-user and per-organization rules will look at it
        if self._allowed and publisher not in self._allowed:
            who = repr(publisher) if publisher else "a publisher without a user_id property"
            msg = f"{who} may not request sign-in tokens"
            raise ForbiddenError(msg)
